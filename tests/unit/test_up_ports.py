"""`ffnskip up` refuses a fixed port that another process listens on, naming the flag."""

from __future__ import annotations

import socket

import pytest

from ffnskip.errors import InvalidArgument
from ffnskip.stack.local import require_free_port


def test_a_port_in_use_is_refused_with_the_flag_to_change():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(InvalidArgument) as caught:
            require_free_port("http_port", port)
        assert caught.value.field == "http_port" and "--http-port 0" in caught.value.problem
    require_free_port("http_port", port)  # free again once the listener closed
    require_free_port("gateway_port", 0)  # any free port
