"""A virtual-clock simulator of heterogeneous swarms, reusing outer/ and local/ (never a second
copy of the math), to compare algorithms quickly on one machine."""
from heloco_p2p.sim.config import HETEROGENEITY_LEVELS, SimConfig, load_sim_config
from heloco_p2p.sim.engine import SimResult, SimSpec, Simulation
from heloco_p2p.sim.runner import make_spec, run_config, run_spec

__all__ = ["HETEROGENEITY_LEVELS", "SimConfig", "load_sim_config", "SimResult", "SimSpec", "Simulation",
           "make_spec", "run_config", "run_spec"]
