"""dep_logs redirects DeepSpeed's own handler only, never a handler someone else put on its logger."""

from __future__ import annotations

import io
import logging

from fastsupmae.engine import dep_logs


class _Foreign(logging.StreamHandler):
    """Like pytest's LogCaptureHandler (attached to non-propagating loggers by pytest >= 9.2): reads its stream."""


def test_only_deepspeeds_own_stream_handler_is_redirected(tmp_path, monkeypatch):
    ds_log = logging.getLogger("DeepSpeed")
    own, foreign = logging.StreamHandler(io.StringIO()), _Foreign(io.StringIO())
    foreign_stream = foreign.stream
    monkeypatch.setattr(ds_log, "handlers", [own, foreign])
    monkeypatch.setattr(dep_logs, "_held", io.StringIO("held line\n"))
    monkeypatch.setattr(dep_logs, "_file", None)
    try:
        path = dep_logs.to_run_dir(tmp_path, 0)
        assert own.stream is dep_logs._file and foreign.stream is foreign_stream
        own.stream.write("after\n")
        own.stream.flush()
        assert path.read_text() == "held line\nafter\n"
    finally:
        if dep_logs._file is not None:
            dep_logs._file.close()
