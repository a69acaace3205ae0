"""Training apps built on mec_torchrec (the DLRM app and its TorchX component)."""
