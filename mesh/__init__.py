"""mesh: a service mesh for hybrid fleets of VMs and containers, deployed the Ansible way."""

__version__ = "0.1.0"
