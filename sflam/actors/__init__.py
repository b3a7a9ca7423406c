"""Ray actors: edge-device workers and the server-part group (torch / DeepSpeed)."""
