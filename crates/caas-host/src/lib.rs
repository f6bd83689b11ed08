//! caas-host: the host agent.
