"""The Ray layer: agent actors, the debate coordinator, placement. Imports only ``mft_ray``."""
