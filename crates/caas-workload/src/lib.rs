//! caas-workload: workloads started by the host agent after trusted launch (seed 003 §4.3).
