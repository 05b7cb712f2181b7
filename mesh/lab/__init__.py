"""mesh lab: a real multi-node hybrid fleet (nspawn VMs, a Docker host, Consul) on one Linux machine."""
