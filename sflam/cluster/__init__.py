"""Ray cluster plumbing: resources, DeepSpeed config, job submission, cluster manifests."""
