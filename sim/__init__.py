"""refmoe-sim: a SimPy model of hybrid MoE inference (PCIe, NUMA, CPU and GPU timing)."""
