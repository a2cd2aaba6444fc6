"""Run cluster.yaml's setup_commands here, as the launcher runs them on a new node, and check
they leave a working ~/venv: its Python is supported and `orchestrator --help` runs.

The node is faked: a temporary home directory, and an image whose PATH holds only `python3`
and `python3.10` (Python 3.10, as on the Deep Learning AMI that cluster.yaml names; override
with TEST_CLUSTER_PYTHON=/path/to/python3.X). The file_mounts targets (/home/ubuntu/...) are
replaced by their sources (the repository), as if rsync had copied them there. pip keeps this
machine's configuration (its PIP_* variables and pip.conf), so its local package mirrors serve
what they hold; the rest comes from PyPI. Run with the standard library and PyYAML, e.g.
``.venv/bin/python scripts/test_cluster_setup.py`` or ``make test-cluster-setup``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def read_yaml(path: Path) -> dict:
    try:
        import yaml
    except ImportError:  # the project's own venv has it; a bare interpreter may not
        sys.exit("needs PyYAML: run it with the project's venv (.venv/bin/python)")
    return yaml.safe_load(path.read_text())


def default_python() -> str:
    found = sorted(Path.home().glob(".pyenv/versions/3.10.*/bin/python3.10"))
    return str(found[-1]) if found else "python3.10"


def main() -> int:
    config = read_yaml(REPO / "cluster.yaml")
    mounts = {remote: str((REPO / local).resolve()) if not local.startswith("~") else local
              for remote, local in config.get("file_mounts", {}).items()}
    commands = list(config["setup_commands"])
    for remote, local in mounts.items():
        commands = [c.replace(remote, local) for c in commands]
    python = os.environ.get("TEST_CLUSTER_PYTHON") or default_python()
    version = subprocess.run([python, "--version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="cluster-setup-") as tmp:
        home, image = Path(tmp) / "home", Path(tmp) / "image-bin"
        home.mkdir()
        image.mkdir()
        minor = re.match(r"Python (3\.\d+)", version).group(1)
        for name in ("python3", f"python{minor}"):
            (image / name).symlink_to(Path(python).resolve())
        env = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}
        env.update(HOME=str(home), PATH=str(image),
                   XDG_CONFIG_HOME=str(Path.home() / ".config"))  # this machine's pip.conf
        print(f"image: python3 -> {version} ({python}); PATH={image}; HOME={home}")
        for command in commands:
            print(f"\n$ {command}", flush=True)
            start = time.monotonic()
            # Ray's launcher runs each command in its own bash on the node.
            proc = subprocess.run(["/bin/bash", "-c", command], env=env)
            print(f"[exit {proc.returncode}, {time.monotonic() - start:.0f} s]", flush=True)
            if proc.returncode:
                print("FAILED: a setup command failed")
                return 1
        venv = home / "venv" / "bin"
        checks = [[str(venv / "python"), "--version"],
                  [str(venv / "orchestrator"), "--help"],
                  [str(venv / "ray"), "--version"]]  # head/worker_start_ray_commands use it
        for check in checks:
            print(f"\n$ {' '.join(check).replace(str(home), '~')}", flush=True)
            proc = subprocess.run(check, env={**env, "RAY_AUTH_TOKEN": "0" * 32})
            if proc.returncode:
                print(f"FAILED: exit {proc.returncode}")
                return 1
    print("\ncluster.yaml setup_commands: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
