"""A proxy's rendered files against its golden folder (tests/golden/envoy/<case>/): each file equal, none missing,
none stale; `pytest --update-goldens` rewrites the folder instead."""

from __future__ import annotations

from pathlib import Path

from mesh.render import ProxyFiles


def check_golden_folder(files: ProxyFiles, folder: Path, update_goldens: bool) -> None:
    rendered = {file.path[len(files.proxy_dir) + 1:]: file.content for file in files.files}
    for relative, content in rendered.items():
        path = folder / relative
        if update_goldens:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
        assert path.is_file(), f"{path} is missing: run pytest --update-goldens"
        assert content == path.read_text(), f"{path} differs: run pytest --update-goldens and review the diff"
    kept = {str(path.relative_to(folder)) for path in folder.rglob("*.yaml")}
    if update_goldens:
        for stale in kept - set(rendered):
            (folder / stale).unlink()
    else:
        assert kept == set(rendered), f"{folder} holds files mesh no longer renders: run pytest --update-goldens"
