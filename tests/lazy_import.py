"""Shared by the engine integration tests: importing proxyattn and an integration module must not
import the engine (it is imported on first use)."""
import os
import subprocess
import sys


def assert_imports_lazily(module: str, engine: str, default_name: str) -> None:
    """In a fresh interpreter, `import proxyattn, <module>` leaves `engine` out of sys.modules, and the
    module's DEFAULT_NAME is `default_name`."""
    code = (f"import sys, proxyattn, {module} as m; "
            f"assert {engine!r} not in sys.modules, '{engine} imported'; print(m.DEFAULT_NAME)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == default_name, res.stderr
