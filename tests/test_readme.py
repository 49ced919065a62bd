"""The README's embedding example runs as written (on the default models)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_embedding_example_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = next(b for b in blocks if "engine.verify" in b)
    assert "estimate(state)" in example  # the example embeds a controller, not only the engine
    streamed: dict[str, str] = {}

    def stream(request_id: str, text: str) -> None:
        streamed[request_id] = streamed.get(request_id, "") + text

    namespace = {"stream": stream}
    exec(compile(example, "README.md", "exec"), namespace)
    assert len(streamed) == 1 and next(iter(streamed.values())).strip()
    assert namespace["engine"].kv_bytes() == 0

    # the streaming example continues on the same engine
    streaming = next(b for b in blocks if "ProgressServe(step_time)" in b)
    exec(compile(streaming, "README.md", "exec"), namespace)
    (result,) = [r for r in namespace["results"].values() if r.stream_units is not None]
    assert result.stream_units > 0 and result.stream_misses is not None


def test_serving_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's openai-client example, against `adactl serve` as the CLI builds it."""
    from adactl.server import ServerThread
    from adactl.server.main import ServeSettings, build_server

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "openai.OpenAI" in b)
    server = build_server(ServeSettings())
    with ServerThread(server.app) as thread:
        assert "http://127.0.0.1:8000" in example
        exec(compile(example.replace("http://127.0.0.1:8000", thread.url), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()
    assert server.service.open_requests() == 0
