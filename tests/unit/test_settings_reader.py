"""ffnskip.settings.Env: the one set of rules every service's settings are read with (an empty
value means the default, one boolean vocabulary, errors that name the variable), and the
settings classes following them."""

from __future__ import annotations

import pytest

from ffnskip.errors import InvalidArgument
from ffnskip.settings import Env
from ffnskip.store.connection import REDIS_ENV_VARS, RedisSettings
from services.calibrator.settings import CalibratorSettings
from services.decoder.settings import DecoderSettings
from services.gateway.settings import GatewaySettings

NAME = "FFNSKIP_SETTING"


def refused(read, value: str) -> InvalidArgument:
    """The error reading `value` from NAME raises."""
    with pytest.raises(InvalidArgument) as caught:
        read(Env({NAME: value}))
    assert caught.value.field == NAME
    return caught.value


@pytest.mark.parametrize("blank", ["", " ", "\t\n"])
def test_absent_empty_and_blank_values_mean_the_default(blank: str) -> None:
    for env in (Env({}), Env({NAME: blank})):
        assert env.value(NAME) is None
        assert env.text(NAME, "fallback") == "fallback" and env.text(NAME, None) is None
        assert env.integer(NAME, 7, minimum=100) == 7  # the default is the code's own: not range-checked
        assert env.integer(NAME, None) is None
        assert env.number(NAME, 0.5) == 0.5
        assert env.flag(NAME, True) is True and env.flag(NAME, False) is False
        assert env.csv(NAME, ("a", "b")) == ("a", "b")
        assert env.choice(NAME, "x", ("x", "y")) == "x"


def test_values_are_stripped() -> None:
    env = Env({NAME: "  value \n", "FFNSKIP_N": " 42 ", "FFNSKIP_CSV": " a , ,b,"})
    assert env.text(NAME, "") == "value"
    assert env.integer("FFNSKIP_N", 0) == 42 and env.number("FFNSKIP_N", 0.0) == 42.0
    assert env.csv("FFNSKIP_CSV", ()) == ("a", "b")
    assert env.csv(NAME, ()) == ("value",)


@pytest.mark.parametrize("word, meaning", [
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), ("Yes", True), ("on", True), ("ON", True),
    ("0", False), ("false", False), ("False", False), ("no", False), ("NO", False), ("off", False), ("Off", False),
])
def test_the_boolean_vocabulary(word: str, meaning: bool) -> None:
    assert Env({NAME: word}).flag(NAME, not meaning) is meaning


@pytest.mark.parametrize("word", ["2", "maybe", "yes please", "t", "enabled"])
def test_other_boolean_words_are_refused(word: str) -> None:
    error = refused(lambda env: env.flag(NAME, False), word)
    assert repr(word) in error.problem and "yes" in error.problem


def test_bad_numbers_name_the_variable() -> None:
    assert refused(lambda env: env.integer(NAME, 0), "abc").problem == "must be an integer, got 'abc'"
    assert refused(lambda env: env.integer(NAME, 0), "1.5").problem == "must be an integer, got '1.5'"
    assert refused(lambda env: env.number(NAME, 0.0), "soon").problem == "must be a number, got 'soon'"
    assert refused(lambda env: env.number(NAME, 0.0), "nan").problem == "must be a number, got 'nan'"


def test_ranges_name_the_variable_and_the_bounds() -> None:
    port = lambda env: env.integer(NAME, 0, minimum=0, maximum=65535)  # noqa: E731
    assert refused(port, "70000").problem == "must be in [0, 65535], got 70000"
    assert refused(port, "-1").problem == "must be in [0, 65535], got -1"
    assert Env({NAME: "65535"}).integer(NAME, 0, minimum=0, maximum=65535) == 65535
    assert refused(lambda env: env.integer(NAME, 0, minimum=1), "0").problem == "must be >= 1, got 0"
    assert refused(lambda env: env.integer(NAME, 0, maximum=10), "11").problem == "must be <= 10, got 11"
    share = lambda env: env.number(NAME, 0.5, above=0, maximum=1)  # noqa: E731
    assert refused(share, "0").problem == "must be in (0, 1], got 0"
    assert refused(share, "1.5").problem == "must be in (0, 1], got 1.5"
    assert Env({NAME: "1"}).number(NAME, 0.5, above=0, maximum=1) == 1.0
    assert refused(lambda env: env.number(NAME, 1.0, above=0), "-inf").problem == "must be > 0, got -inf"
    assert refused(lambda env: env.number(NAME, 1.0, minimum=0.5), "0.25").problem == "must be >= 0.5, got 0.25"


def test_choice_is_exact() -> None:
    assert Env({NAME: "y"}).choice(NAME, "x", ("x", "y")) == "y"
    assert refused(lambda env: env.choice(NAME, "x", ("x", "y")), "Y").problem == "must be one of x, y, got 'Y'"


def test_the_error_message_starts_with_the_variable() -> None:
    assert str(refused(lambda env: env.integer(NAME, 0), "abc")) == f"{NAME}: must be an integer, got 'abc'"


# ------------------------------------------------------------------- the settings classes

def test_redis_settings_follow_the_rules() -> None:
    assert RedisSettings.from_env({}) == RedisSettings()
    blank = {"FFNSKIP_REDIS_URL": "", "FFNSKIP_REDIS_PASSWORD": " ", "FFNSKIP_REDIS_TLS": "", "FFNSKIP_REDIS_DB": ""}
    assert RedisSettings.from_env(blank) == RedisSettings()
    settings = RedisSettings.from_env({"FFNSKIP_REDIS_URL": "redis://redis:6380/1", "FFNSKIP_REDIS_TLS": "on",
                                       "FFNSKIP_REDIS_DB": "3", "FFNSKIP_REDIS_PASSWORD": "secret\n"})
    assert (settings.url, settings.tls, settings.db, settings.password) == ("redis://redis:6380/1", True, 3, "secret")
    for name, value in (("FFNSKIP_REDIS_TLS", "maybe"), ("FFNSKIP_REDIS_DB", "two"), ("FFNSKIP_REDIS_DB", "-1"),
                        ("FFNSKIP_REDIS_URL", "http://redis:6379")):
        with pytest.raises(InvalidArgument) as caught:
            RedisSettings.from_env({name: value})
        assert caught.value.field == name


def test_redis_variables_are_named_once_and_listed_by_every_service() -> None:
    import inspect
    import re

    from services.calibrator import settings as calibrator_settings
    from services.decoder import settings as decoder_settings
    from services.gateway import settings as gateway_settings

    read = re.findall(r'"(FFNSKIP_[A-Z0-9_]+)"', inspect.getsource(RedisSettings.from_env))
    assert set(REDIS_ENV_VARS) == set(read) and len(REDIS_ENV_VARS) == len(set(REDIS_ENV_VARS))
    for module in (calibrator_settings, decoder_settings, gateway_settings):  # listed, not copied
        assert set(REDIS_ENV_VARS) <= set(module.ENV_VARS), module.__name__
        assert '"FFNSKIP_REDIS_' not in inspect.getsource(module), module.__name__


def test_every_service_reads_empty_values_as_defaults() -> None:
    decoder = DecoderSettings.from_env({"FFNSKIP_DECODER_PORT": "", "FFNSKIP_COMPILE": " ", "FFNSKIP_DEVICE": "",
                                        "FFNSKIP_ALIGNED_QUORUM": "", "FFNSKIP_ALLOWED_POLICIES": ""})
    assert decoder.port == 50052 and decoder.compile is True and decoder.device == "auto"
    assert decoder.aligned_quorum == 0.5 and decoder.limits.policies == DecoderSettings.from_env({}).limits.policies
    calibrator = CalibratorSettings.from_env({"FFNSKIP_CALIBRATOR_PORT": " ", "FFNSKIP_MODELS": "", "FFNSKIP_DEVICE": ""})
    assert calibrator == CalibratorSettings.from_env({})
    gateway = GatewaySettings.from_env({"FFNSKIP_AUTH_DISABLED": "yes", "FFNSKIP_GATEWAY_PORT": "",
                                        "FFNSKIP_TLS_CERT": " ", "FFNSKIP_MAX_ATTEMPTS": ""})
    assert gateway.auth_disabled and gateway.port == 50051 and gateway.tls_cert is None and gateway.max_attempts == 3


@pytest.mark.parametrize("word, meaning", [("yes", True), ("on", True), ("no", False), ("OFF", False)])
def test_every_service_speaks_the_same_booleans(word: str, meaning: bool) -> None:
    assert DecoderSettings.from_env({"FFNSKIP_COMPILE": word}).compile is meaning
    assert GatewaySettings.from_env({"FFNSKIP_AUTH_DISABLED": "1", "FFNSKIP_REDIS_TLS": word}).redis.tls is meaning
    assert CalibratorSettings.from_env({"FFNSKIP_REDIS_TLS": word}).redis.tls is meaning


def test_decoder_errors_name_the_variable() -> None:
    for name, value in (("FFNSKIP_DECODER_PORT", "http"), ("FFNSKIP_MAX_BATCH", "many"),
                        ("FFNSKIP_STUCK_AFTER_S", "0"), ("FFNSKIP_REGISTRY_TTL_S", "soon"),
                        ("FFNSKIP_ALLOWED_POLICIES", "dense,telepathy"), ("FFNSKIP_COMPILE", "2")):
        with pytest.raises(InvalidArgument) as caught:
            DecoderSettings.from_env({name: value})
        assert caught.value.field == name
