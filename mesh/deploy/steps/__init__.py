"""The mesh.* modules playbooks/deploy.yml uses (and `user`, Ansible's builtin the runner lacked), registered
into a registry the caller owns. It owns their names and arguments; the steps themselves live beside it.

    modules = registry.copy(); register_mesh_modules(modules)
    playbook = load_playbook("playbooks/deploy.yml", modules)
"""

from __future__ import annotations

from mesh.containers.modules import register_container_modules
from mesh.deploy.modules import ModuleRegistry
from mesh.deploy.steps import cleanup, controller, ctl_access, gate, host, proxy


def register_mesh_modules(modules: ModuleRegistry) -> None:
    """Add the deploy's modules to `modules`; their `shared` must be a DeployContext."""
    modules.register("user", host.user, ("name", "system", "create_home", "shell", "state", "comment"))
    modules.register("mesh.prerequisites", host.prerequisites, ("controller",))
    modules.register("mesh.envoy_binary", host.envoy_binary, ("dest", "mode"))
    modules.register("mesh.firewall", host.firewall, ())
    modules.register("mesh.proxy_folder", proxy.proxy_folder, ("proxy",))
    modules.register("mesh.certificate", proxy.certificate, ("proxy", "checker"))
    modules.register("mesh.proxy_files", proxy.proxy_files, ("proxy", "image"))
    modules.register("mesh.envoy_unit", proxy.envoy_unit, ("proxy",))
    modules.register("mesh.proxies_current", proxy.proxies_current, ("all",))
    modules.register("mesh.cleanup", cleanup.cleanup, ())
    modules.register("mesh.health_gate", gate.health_gate, ("wait",))
    modules.register("mesh.checker_env", controller.checker_env, ())
    modules.register("mesh.checker_config", controller.checker_config_file, ())
    modules.register("mesh.checker_consul_files", controller.checker_consul_files, ())
    modules.register("mesh.checker_unit", controller.checker_unit, ())
    modules.register("mesh.role_user", ctl_access.role_user, ("name",))
    modules.register("mesh.planned_files", ctl_access.planned_files, ("group",))
    modules.register("mesh.controller_service", ctl_access.controller_service, ("restart", "reload"))
    register_container_modules(modules)  # mesh.sidecar_image, mesh.sidecar, mesh.sidecar_host
