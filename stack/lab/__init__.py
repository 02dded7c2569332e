"""Labs: topologies of tapstack nodes and Linux hosts in network namespaces."""
