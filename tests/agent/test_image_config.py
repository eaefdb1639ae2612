"""The image config the agent keeps (agent.images.store.ImageConfig): Docker's HEALTHCHECK read from an image
config (Go durations in nanoseconds), kept in the image record and read back, also from records written before
images' checks were kept; a malformed one is a clear error."""

from __future__ import annotations

import pytest

from agent.images import RegistryError
from agent.images.store import ImageConfig, _image_config


def test_healthcheck_from_the_image_config_and_through_the_record() -> None:
    config = _image_config({"config": {"Cmd": ["sh"], "Healthcheck": {
        "Test": ["CMD-SHELL", "wget -q -O- localhost"], "Interval": 5_000_000_000, "Timeout": 500_000_000,
        "StartPeriod": 60_000_000_000, "Retries": 4}}})
    assert (config.health_test, config.health_interval_s, config.health_timeout_s, config.health_start_period_s,
            config.health_retries) == (("CMD-SHELL", "wget -q -O- localhost"), 5.0, 0.5, 60.0, 4)
    assert ImageConfig.from_record(config.record()) == config
    assert _image_config({"config": {"Cmd": ["sh"]}}).health_test == ()


def test_a_record_from_before_image_checks_reads_as_no_check() -> None:
    old = {"entrypoint": [], "cmd": ["sh"], "env": ["PATH=/bin"], "workdir": "", "user": ""}
    assert ImageConfig.from_record(old) == ImageConfig(cmd=("sh",), env=("PATH=/bin",))


def test_a_malformed_healthcheck_is_a_clear_error() -> None:
    with pytest.raises(RegistryError, match="malformed Healthcheck"):
        _image_config({"config": {"Healthcheck": {"Test": ["CMD", "true"], "Interval": "soon"}}})
    with pytest.raises(RegistryError, match=r"Healthcheck\.Test"):
        _image_config({"config": {"Healthcheck": {"Test": "true"}}})
