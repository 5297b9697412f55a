"""The workstation side: the MoDE model, expert training, composition, baselines and evaluation (needs torch)."""

import logging

# torchao (installed for export; transformers imports it when present) registers Enum types the old way, and torch
# logs a deprecation warning for each at import: noise for a user, nothing they can act on.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
