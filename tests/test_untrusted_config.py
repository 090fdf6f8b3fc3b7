"""Configs read from a run folder, an export or the Hub are data (issue 20, item 3): OmegaConf's
resolvers never run on them (`${oc.env:...}` would read the environment), and no URL in them is
followed."""
from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from resnet.config import ConfigError, load_saved_config
from resnet.deliver.hub import write_examples
from resnet.deliver.source import resolve
from resnet.model import build_model
from resnet.runfolder import WEIGHTS_FILE


@pytest.fixture
def listener():
    """A loopback HTTP server that records every path asked of it (and answers 404)."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  (the library's name)
            asked.append(self.path)
            self.send_error(404)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", asked
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_a_run_folder_with_an_env_interpolation_leaks_nothing(tmp_path, listener, monkeypatch):
    """Someone's folder: model.safetensors and a config.yaml whose data.train and data.val
    ask OmegaConf for AWS_SECRET_ACCESS_KEY. Resolving it (what predict, export and demo do)
    and writing an export's examples send no request, and the value stays as written."""
    url, asked = listener
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "the-secret-value")
    folder = tmp_path / "someones-run"
    folder.mkdir()
    save_file(build_model("resnet18", 4).state_dict(), str(folder / WEIGHTS_FILE))
    hostile = f"{url}/${{oc.env:AWS_SECRET_ACCESS_KEY}}"
    (folder / "config.yaml").write_text(
        f"model:\n  arch: resnet18\ndata:\n  train: {hostile}\n  val: {hostile}\n")
    trained = resolve(str(folder))
    assert trained.cfg.data.train == hostile  # as written, not resolved
    assert write_examples(trained, tmp_path / "export") == []
    assert asked == []
    assert "the-secret-value" not in repr(trained.cfg)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from("${}\\:.a/ "), max_size=24))
def test_every_string_of_a_saved_config_comes_back_as_written(tmp_path_factory, value):
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": value}}))
    assert load_saved_config(path).data.train == value


def test_a_saved_config_with_aliases_or_unknown_keys_is_refused_naming_it(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("data:\n  train: &x abc\n  val: *x\n")
    with pytest.raises(ConfigError, match="alias"):
        load_saved_config(path)
    path.write_text("data:\n  trian: abc\n")
    with pytest.raises(ConfigError, match="unknown config key 'data.trian'"):
        load_saved_config(path)
