"""The topology table lives in the library (`flax_gpt2.utils.topologies`: the server's `--compile_only` reads it
too); train/ keeps importing it under its old name."""

from flax_gpt2.utils.topologies import (ALIASES, GENERATIONS, GPUS_PER_HOST, TOPOLOGIES, Generation, GiB, GpuTarget,
                                        Topology, accepted_names, canonical_name, devices, gpu_target_config, lookup,
                                        prepare_environment)

__all__ = ["ALIASES", "GENERATIONS", "GPUS_PER_HOST", "TOPOLOGIES", "Generation", "GiB", "GpuTarget", "Topology",
           "accepted_names", "canonical_name", "devices", "gpu_target_config", "lookup", "prepare_environment"]
