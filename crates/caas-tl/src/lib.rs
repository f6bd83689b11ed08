//! caas-tl: trusted launch and domain-based storage protection (seed 003 §4.3, §4.4).
