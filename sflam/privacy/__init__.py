"""Privacy of what crosses the link: attacks on the smashed data, leakage metrics, defences, DP accounting.

Threat model (docs/concepts/privacy.md). The server is honest but curious: it runs the protocol faithfully and
tries to learn the devices' inputs from what it receives. It

- sees every smashed-data message exactly as it arrives: after the codec (quantized and decoded),
  with whatever noise a defence added, together with the attention mask (so every sentence's length);
- knows the device part's architecture and its current weights (white-box): it distributes the
  global device adapter itself, and the frozen base weights are the public pretrained model's;
- holds auxiliary public data of the same domain: in our measurements a seeded part of the task's
  train split, disjoint from the victims (the held-out test split), which are never seen in training
  the attacks.

With the head on the server, labels are sent in the clear to the server: every leakage report says
so. The attacks measure how much of the *inputs* the messages give away.

Modules, one job each:

- `target`: the narrow interface, an input batch -> the message the server sees;
- `build`: a Target and the attack data (auxiliary set, victims) from an ExperimentConfig;
- `defences`: per-sample clipping and Gaussian noise, NoPeek's distance-correlation loss (functions
  for the local training step);
- `metrics`: token accuracy, ROUGE-L, SSIM, PSNR, distance correlation;
- `accounting`: (epsilon, delta) of the clipped-and-noised messages with Opacus' accountant, and the
  guarantee stated precisely;
- `attack`: what every attack is (the base class, the auxiliary data and intercepted messages);
- `linear`, `inverse`, `whitebox`: the least-squares baselines, the learned inverse models, the
  optimisation-based white-box inversion;
- `suite`: the attack registry, the run of the configured attacks and their common scoring;
- `report`: the leakage table, privacy.json, privacy.md and privacy.png.
"""
