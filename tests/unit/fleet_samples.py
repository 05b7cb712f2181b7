"""A small fleet as an inventory text (a VM, a container host, a controller, and a Consul host mesh leaves
alone), for the unit tests of what reads every managed host. Nothing here is a test."""

FLEET_INVENTORY = """\
all:
  vars:
    mesh_trust_domain: lab.mesh
    mesh_consul_url: http://127.0.0.1:1
    mesh_state_dir: state
  children:
    consul:
      hosts:
        consul1: {ansible_host: 10.77.0.2}
    mesh_controllers:
      hosts:
        ctl1: {ansible_host: 10.77.0.3}
    vms:
      hosts:
        vm1:
          ansible_host: 10.77.0.11
          mesh_workloads:
            - {service: web, port: 8080}
    containers:
      vars: {mesh_host_kind: container_host}
      hosts:
        dock1:
          ansible_host: 10.77.0.20
          mesh_workloads:
            - {service: api, port: 9090, container: api-1}
"""
