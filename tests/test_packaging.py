"""What a user installs: the wheel built from this tree carries the prebuilt JupyterLab extension and the server
extension's config, so `pip install mpitasker_ext` needs no node and no manual step."""

import subprocess
import sys
import zipfile

from conftest import REPO


def test_the_wheel_carries_the_prebuilt_lab_extension(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), REPO],
                   check=True, capture_output=True, text=True, timeout=600)
    [wheel] = tmp_path.glob("mpitasker_ext-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    lab = [n for n in names if "/data/share/jupyter/labextensions/mpitasker-ext/" in n]
    assert any(n.endswith("/mpitasker-ext/package.json") for n in lab), names
    assert any(n.endswith("/mpitasker-ext/install.json") for n in lab), names
    assert any("/mpitasker-ext/static/remoteEntry." in n and n.endswith(".js") for n in lab), names
    assert any(n.endswith("etc/jupyter/jupyter_server_config.d/mpitasker_ext.json") for n in names), names
    assert not any(n.startswith("mpitasker_ext/labextension/") for n in names)   # shipped once, as shared data
