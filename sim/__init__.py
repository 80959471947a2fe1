"""refmoe-sim: the SimPy model of hybrid MoE inference (issue 7; not built yet)."""
