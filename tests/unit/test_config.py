"""Unit tests for cxrd.config: defaults, loading, validation messages, paths, describe()."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path

import pytest

from cxrd.config import (
    ENV_CONFIG,
    Config,
    LogFormat,
    SrSopClass,
    TlsConfig,
    default_config,
    describe,
    load_config,
    parse_listen,
    usable_cpus,
    validate,
    worker_processes,
    worker_threads,
)
from cxrd.errors import ConfigError, CxrdError

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"


def problems_of(toml_text: str, base_dir: Path) -> list[str]:
    """Validate TOML text and return the problems it raises (failing if none)."""
    with pytest.raises(ConfigError) as info:
        validate(tomllib.loads(toml_text), base_dir=base_dir)
    assert info.value.problems, "ConfigError without problems"
    return info.value.problems


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- defaults


def test_defaults_without_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(env={})

    assert config.source is None
    assert config.base_dir == tmp_path
    assert config.node.ae_title == "CXRD"
    assert config.node.host == "0.0.0.0"
    assert config.node.port == 11112
    assert config.node.allowed_callers == ()
    assert config.node.tls is None
    assert config.node.max_pdu == 131072
    assert config.node.receivers == 1
    assert config.storage.data_dir == tmp_path / "cxrd-data"
    assert config.storage.database_url == ""
    assert config.storage.retention_days == 0  # keep for ever
    assert config.watch.folders == ()
    assert config.watch.settle_seconds == 2.0
    assert config.study.stable_seconds == 10
    assert config.model.path is None
    assert config.model.uses_embedded_model
    assert config.model.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert config.model.intra_op_threads == 0
    assert config.workers.processes is None  # "auto"
    assert worker_processes(config) == max(1, usable_cpus())
    assert config.workers.batch_size == 4
    assert config.workers.lease_seconds == 300
    assert config.workers.max_attempts == 3
    assert config.workers.retry_backoff_seconds == 30
    assert config.results.folder is None
    assert config.results.structured_report is True
    assert config.results.heatmap_secondary_capture is True
    assert config.results.parametric_map is False
    assert config.results.sr_sop_class is SrSopClass.COMPREHENSIVE_3D
    assert config.results.sr_sop_class.uid == "1.2.840.10008.5.1.4.1.1.88.34"
    assert config.metrics.listen == "127.0.0.1:9464"
    assert parse_listen(config.metrics.listen) == ("127.0.0.1", 9464)
    assert config.logging.level == "INFO"
    assert config.logging.format is LogFormat.TEXT
    assert config.destinations == ()
    assert config.sender.calling_ae == "CXRD"
    assert config.sender.max_age_hours == 168
    assert config.sender.initial_backoff_seconds == 5
    assert config.sender.max_backoff_seconds == 1800
    assert config.sender.dimse_timeout_seconds == 120


def test_derived_paths_default(tmp_path: Path) -> None:
    config = default_config(tmp_path)
    data = tmp_path / "cxrd-data"
    assert config.storage.incoming_dir == data / "incoming"
    assert config.storage.spool_dir == data / "spool"
    assert config.storage.rejected_dir == data / "rejected"
    assert config.results.results_dir == data / "results"
    assert config.storage.database_url_resolved == f"sqlite:///{data}/cxrd.sqlite3"
    assert config.storage.database_url_resolved.startswith("sqlite:////")


def test_config_is_frozen(tmp_path: Path) -> None:
    config = default_config(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.node.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.node = config.node  # type: ignore[misc]


# --------------------------------------------------------------------------- loading


def test_cxrd_config_env_names_the_file(tmp_path: Path) -> None:
    file = write(tmp_path / "cxrd.toml", "[node]\nport = 4000\n")
    config = load_config(env={ENV_CONFIG: str(file)})
    assert config.node.port == 4000
    assert config.source == file


def test_explicit_path_wins_over_env(tmp_path: Path) -> None:
    env_file = write(tmp_path / "env.toml", "[node]\nport = 4000\n")
    arg_file = write(tmp_path / "arg.toml", "[node]\nport = 5000\n")
    assert load_config(arg_file, env={ENV_CONFIG: str(env_file)}).node.port == 5000


def test_empty_env_var_means_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(env={ENV_CONFIG: ""}).source is None


def test_missing_named_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="no such configuration file") as info:
        load_config(missing, env={})
    assert str(missing) in str(info.value)
    with pytest.raises(ConfigError, match=re.escape(f"${ENV_CONFIG}")):
        load_config(env={ENV_CONFIG: str(missing)})


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    file = write(tmp_path / "bad.toml", '[node]\nport = 11112\nhost = "0.0.0.0\n')
    with pytest.raises(ConfigError) as info:
        load_config(file, env={})
    message = str(info.value)
    assert str(file) in message
    assert "line 3" in message
    assert len(info.value.problems) == 1
    assert isinstance(info.value.__cause__, tomllib.TOMLDecodeError)
    assert isinstance(info.value, CxrdError)


def test_example_file_loads_clean_and_matches_defaults() -> None:
    config = load_config(EXAMPLE, env={})
    defaults = validate({}, base_dir=EXAMPLE.parent)
    assert dataclasses.replace(config, source=None) == defaults


def test_example_commented_blocks_are_valid(tmp_path: Path) -> None:
    """Uncommenting the TLS, calling_ae, destination and notification examples gives a
    valid file."""
    text = re.sub(r"(?m)^# (?=\[|\w+ = )", "", EXAMPLE.read_text(encoding="utf-8"))
    file = write(tmp_path / "cxrd.toml", text)
    for name in ("cxrd.crt", "cxrd.key", "hospital-ca.pem", "cxrd-client.crt", "cxrd-client.key"):
        write(tmp_path / "tls" / name, "PEM\n")
    for name in ("archive.token", "orthanc.password", "worklist.token"):
        write(tmp_path / "secrets" / name, "secret\n")
    config = load_config(file, env={})
    assert config.node.tls == TlsConfig(
        certificate=tmp_path / "tls/cxrd.crt",
        key=tmp_path / "tls/cxrd.key",
        ca=tmp_path / "tls/hospital-ca.pem",
        require_client_cert=True,
    )
    assert [d.name for d in config.destinations] == ["pacs", "pacs-tls", "archive", "orthanc"]
    assert config.destinations[0].tls is None
    tls = config.destinations[1].tls
    assert tls is not None and tls.ca == tmp_path / "tls/hospital-ca.pem"
    archive, orthanc = config.destinations[2:]
    assert archive.is_stow and archive.token_file == tmp_path / "secrets/archive.token"
    assert orthanc.url == "http://127.0.0.1:8042/dicom-web" and orthanc.username == "cxrd"
    assert orthanc.password_file == tmp_path / "secrets/orthanc.password"
    worklist, ris = config.notifications
    assert worklist.kind.value == "webhook" and worklist.findings == ("TB",)
    assert worklist.token_file == tmp_path / "secrets/worklist.token"
    assert ris.kind.value == "hl7" and (ris.port, ris.findings) == (2575, ("TB", "NTB"))


# --------------------------------------------------------------------------- bad values

BAD_VALUES = [
    # (TOML, key named in the message, another fragment the message must contain)
    ('[node]\nae_title = "THIS_IS_FAR_TOO_LONG"', "node.ae_title", "THIS_IS_FAR_TOO_LONG"),
    ('[node]\nae_title = "A\\\\B"', "node.ae_title", "backslash"),
    ('[node]\nae_title = "    "', "node.ae_title", "all spaces"),
    ('[node]\nae_title = "A\\tB"', "node.ae_title", "control"),
    ('[node]\nae_title = ""', "node.ae_title", "1-16"),
    ("[node]\nport = 0", "node.port", "1 to 65535"),
    ("[node]\nport = 70000", "node.port", "70000"),
    ('[node]\nport = "11112"', "node.port", "expected an integer"),
    ("[node]\nport = true", "node.port", "expected an integer"),
    ("[node]\nport = 11112.0", "node.port", "expected an integer"),
    ('[node]\nhost = ""', "node.host", "host name"),
    ('[node]\nallowed_callers = ["PACS", "X@"]', "node.allowed_callers[1]", "AE@host"),
    ('[node]\nallowed_callers = ["WAY_TOO_LONG_AE_TITLE@h"]', "node.allowed_callers[0]", "1-16"),
    ('[node]\nallowed_callers = "PACS"', "node.allowed_callers", "expected an array"),
    ("[node]\nallowed_callers = [1]", "node.allowed_callers[0]", "expected a string"),
    ("[node]\nmax_pdu = 10", "node.max_pdu", "unlimited"),
    ("[node]\nreceivers = 0", "node.receivers", "0"),
    ('[node.tls]\ncertificate = "nope.crt"\nkey = "nope.key"', "node.tls.certificate", "nope.crt"),
    ('[node.tls]\nca = "nope.pem"', "node.tls.ca", "does not exist"),
    ("[node]\ntls = 5", "node.tls", "expected a table"),
    ('[storage]\ndata_dir = ""', "storage.data_dir", "not empty"),
    ('[storage]\ndatabase_url = "mysql://db"', "storage.database_url", "postgresql"),
    ('[storage]\nmin_free_mb = -1', "storage.min_free_mb", "from 0"),
    ('[storage]\nmin_free_mb = "1G"', "storage.min_free_mb", "integer"),
    ("[storage]\nretention_days = -1", "storage.retention_days", "keep for ever"),
    ("[storage]\nretention_days = 1.5", "storage.retention_days", "expected an integer"),
    ('[watch]\nfolders = [""]', "watch.folders[0]", "folder"),
    ("[watch]\nsettle_seconds = -1", "watch.settle_seconds", "at least 0"),
    ("[study]\nstable_seconds = 0", "study.stable_seconds", "greater than 0"),
    ('[study]\nstable_seconds = "10"', "study.stable_seconds", "expected a number"),
    ('[model]\npath = "missing.onnx"', "model.path", "missing.onnx"),
    ("[model]\nproviders = []", "model.providers", "non-empty"),
    ('[model]\nproviders = ["GPU"]', "model.providers[0]", "CPUExecutionProvider"),
    ('[model]\nproviders = ["cudaexecutionprovider"]', "model.providers[0]", "did you mean"),
    ("[model]\nintra_op_threads = -1", "model.intra_op_threads", "-1"),
    ("[workers]\nprocesses = -1", "workers.processes", "from 0"),
    ("[workers]\nbatch_size = 0", "workers.batch_size", "1 to 256"),
    ("[workers]\nbatch_size = 257", "workers.batch_size", "257"),
    ("[workers]\nlease_seconds = 0", "workers.lease_seconds", "greater than 0"),
    ("[workers]\nmax_attempts = 0", "workers.max_attempts", "0"),
    ("[workers]\nretry_backoff_seconds = -5", "workers.retry_backoff_seconds", "-5"),
    ('[results]\nsr_sop_class = "basic"', "results.sr_sop_class", "comprehensive3d"),
    ('[results]\nstructured_report = "yes"', "results.structured_report", "boolean"),
    ('[metrics]\nlisten = "localhost"', "metrics.listen", "host:port"),
    ('[metrics]\nlisten = "::1:9464"', "metrics.listen", "[ipv6]:port"),
    ('[metrics]\nlisten = "127.0.0.1:0"', "metrics.listen", "65535"),
    ('[logging]\nlevel = "TRACE"', "logging.level", "DEBUG, INFO, WARNING, ERROR"),
    ('[logging]\nformat = "xml"', "logging.format", '"json"'),
    ("[sender]\nmax_age_hours = 0", "sender.max_age_hours", "greater than 0"),
    ("[sender]\ndimse_timeout_seconds = 0", "sender.dimse_timeout_seconds", "greater than 0"),
    ('[sender]\ncalling_ae = "WAY_TOO_LONG_AE_TITLE"', "sender.calling_ae", "1-16"),
    (
        "[sender]\ninitial_backoff_seconds = 60\nmax_backoff_seconds = 10",
        "sender.max_backoff_seconds",
        "initial_backoff_seconds",
    ),
    ('[[destinations]]\nname = "p"\nae_title = "P"\nport = 104', "destinations[0].host", "missing"),
    (
        '[[destinations]]\nname = ""\nae_title = "P"\nhost = "h"\nport = 104',
        "destinations[0].name",
        "non-empty",
    ),
    (
        '[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 0',
        "destinations[0].port",
        "65535",
    ),
    (
        '[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 104\n'
        '[[destinations]]\nname = "p"\nae_title = "Q"\nhost = "h"\nport = 104',
        "destinations[1].name",
        "unique",
    ),
    (
        '[[destinations]]\nname = "p"\nae_title = "BAD\\\\AE"\nhost = "h"\nport = 104',
        "destinations[0].ae_title",
        "backslash",
    ),
    ('[destinations]\nname = "p"', "destinations", "[[destinations]]"),
    ('[storage]\nstore = "s3://"', "storage.store", "3 to 63"),
    ('[storage]\nstore = "s3://My_Bucket/x"', "storage.store", "lowercase"),
    ('[storage]\nstore = "s3://192.168.1.10"', "storage.store", "IP address"),
    ('[storage]\nstore = "s3://ab..cd"', "storage.store", "two dots"),
    ('[storage]\nstore = "s3://bucket/../etc"', "storage.store", "'..'"),
    ('[storage]\nstore = "gs://bucket"', "storage.store", "s3://bucket[/prefix]"),
    ('[storage]\nstore = 5', "storage.store", "string"),
    ('[storage]\ns3_endpoint_url = "localhost:9000"', "storage.s3_endpoint_url", "http://"),
    ('[storage]\ns3_endpoint_url = "ftp://h:21"', "storage.s3_endpoint_url", "https://"),
    ('[storage]\ns3_endpoint_url = "http://h:99999"', "storage.s3_endpoint_url", "http://"),
    ('[storage]\ns3_endpoint_url = "http://h:9000/?x=1"', "storage.s3_endpoint_url", "query"),
    ("node = 5", "node", "expected a table"),
]


@pytest.mark.parametrize(("toml_text", "key", "fragment"), BAD_VALUES)
def test_bad_value_names_the_key(tmp_path: Path, toml_text: str, key: str, fragment: str) -> None:
    problems = problems_of(toml_text, tmp_path)
    matching = [p for p in problems if p.startswith(f"{key}:")]
    assert matching, f"no problem names {key}: {problems}"
    assert any(fragment in p for p in matching), f"{fragment!r} not in {matching}"


def test_tls_rules(tmp_path: Path) -> None:
    cert = write(tmp_path / "c.pem", "x")
    problems = problems_of(f'[node.tls]\ncertificate = "{cert}"', tmp_path)
    assert any(p.startswith("node.tls.key: missing") for p in problems)

    problems = problems_of(
        f'[node.tls]\ncertificate = "{cert}"\nkey = "{cert}"\nrequire_client_cert = true',
        tmp_path,
    )
    assert any(p.startswith("node.tls.require_client_cert:") and "ca" in p for p in problems)

    problems = problems_of(f'[node.tls]\nca = "{cert}"', tmp_path)
    assert any(p.startswith("node.tls.certificate: missing") for p in problems)


def test_several_problems_reported_at_once(tmp_path: Path) -> None:
    text = """
[node]
ae_title = "THIS_IS_FAR_TOO_LONG"
port = "11112"
[workers]
batch_size = 1000
processes = -1
[logging]
level = "LOUD"
[metrics]
listen = "nowhere"
"""
    with pytest.raises(ConfigError) as info:
        validate(tomllib.loads(text), base_dir=tmp_path)
    problems = info.value.problems
    assert len(problems) == 6, problems
    keys = [p.split(":", 1)[0] for p in problems]
    assert keys == [
        "node.ae_title",
        "node.port",
        "workers.processes",
        "workers.batch_size",
        "metrics.listen",
        "logging.level",
    ]
    message = str(info.value)
    lines = message.splitlines()
    assert "6 problems" in lines[0]
    for problem in problems:
        assert problem in message
    assert len(lines) == 1 + len(problems)


def test_unknown_key_and_section_suggest_the_right_name(tmp_path: Path) -> None:
    text = """
[node]
prot = 11112
[wokers]
processes = 2
[[destinations]]
name = "p"
ae_tilte = "P"
ae_title = "P"
host = "h"
port = 104
"""
    problems = problems_of(text, tmp_path)
    assert 'node.prot: unknown key; did you mean "port"?' in problems
    assert "wokers: unknown section; did you mean [workers]?" in problems
    assert 'destinations[0].ae_tilte: unknown key; did you mean "ae_title"?' in problems
    assert len(problems) == 3


def test_unknown_key_without_close_match_lists_allowed(tmp_path: Path) -> None:
    problems = problems_of("[study]\nzzz = 1", tmp_path)
    assert problems == ["study.zzz: unknown key; allowed keys: stable_seconds, "
                        "classify_on_arrival"]


def test_top_level_key_outside_its_section(tmp_path: Path) -> None:
    problems = problems_of("batch_size = 4", tmp_path)
    assert problems == ["batch_size: unknown section; this key belongs under [workers]"]


# --------------------------------------------------------------------------- good values


def test_valid_non_default_values(tmp_path: Path) -> None:
    model = write(tmp_path / "m.onnx", "not really onnx")
    text = f"""
[node]
ae_title = "AI NODE"
host = "::"
allowed_callers = ["PACS", "CT1@10.0.0.5"]
max_pdu = 0
receivers = 4
[storage]
database_url = "postgresql+psycopg://cxrd:secret@db/cxrd"
retention_days = 30
[model]
path = "{model.name}"
providers = ["CPUExecutionProvider"]
intra_op_threads = 2
[results]
sr_sop_class = "enhanced"
[metrics]
listen = "[::1]:9464"
[logging]
level = "debug"
format = "json"
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "pacs.example"
port = 104
"""
    config = validate(tomllib.loads(text), base_dir=tmp_path)
    assert config.node.max_pdu == 0
    assert config.node.receivers == 4
    assert config.sender.calling_ae == "AI NODE"  # defaults to node.ae_title
    assert config.storage.database_url_resolved == "postgresql+psycopg://cxrd:secret@db/cxrd"
    assert config.storage.retention_days == 30
    assert config.model.path == model
    assert not config.model.uses_embedded_model
    assert config.results.sr_sop_class.uid == "1.2.840.10008.5.1.4.1.1.88.22"
    assert parse_listen(config.metrics.listen) == ("::1", 9464)
    assert config.logging.level == "DEBUG"
    assert config.logging.format is LogFormat.JSON
    assert config.destinations[0].port == 104
    assert config.node.is_caller_allowed("PACS", "192.168.1.1")
    assert config.node.is_caller_allowed("CT1 ", "10.0.0.5")
    assert not config.node.is_caller_allowed("CT1", "10.0.0.6")
    assert not config.node.is_caller_allowed("OTHER", "10.0.0.5")


def test_metrics_off_and_parse_listen() -> None:
    config = validate({"metrics": {"listen": ""}}, base_dir="/")
    assert not config.metrics.enabled
    assert config.metrics.listen == ""
    assert parse_listen("0.0.0.0:9000") == ("0.0.0.0", 9000)
    with pytest.raises(ValueError):
        parse_listen("host:99999")


# --------------------------------------------------------------------------- paths


def test_relative_paths_resolve_against_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    confdir = tmp_path / "etc" / "cxrd"
    write(confdir / "models" / "m.onnx", "x")
    file = write(
        confdir / "cxrd.toml",
        """
[storage]
data_dir = "data"
[watch]
folders = ["../drop", "/abs/in"]
[model]
path = "models/m.onnx"
[results]
folder = "out"
""",
    )
    monkeypatch.chdir(tmp_path)  # somewhere else: the CWD must not matter
    config = load_config(file, env={})
    assert config.base_dir == confdir
    assert config.storage.data_dir == confdir / "data"
    assert config.storage.incoming_dir == confdir / "data" / "incoming"
    assert config.storage.database_url_resolved == f"sqlite:///{confdir}/data/cxrd.sqlite3"
    assert config.watch.folders == (tmp_path / "etc" / "drop", Path("/abs/in"))
    assert config.model.path == confdir / "models" / "m.onnx"
    assert config.results.results_dir == confdir / "out"


def test_relative_sqlite_url_resolves_against_the_file(tmp_path: Path) -> None:
    file = write(tmp_path / "cxrd.toml", '[storage]\ndatabase_url = "sqlite:///db/q.sqlite3"\n')
    config = load_config(file, env={})
    assert config.storage.database_url == f"sqlite:///{tmp_path}/db/q.sqlite3"


def test_relative_paths_without_file_use_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(env={}).storage.data_dir == tmp_path / "cxrd-data"


# --------------------------------------------------------------------------- describe


def test_describe_is_json_serialisable_and_hides_secrets(tmp_path: Path) -> None:
    key = write(tmp_path / "tls" / "node.key", "-----BEGIN PRIVATE KEY----- SECRET")
    cert = write(tmp_path / "tls" / "node.crt", "-----BEGIN CERTIFICATE-----")
    text = f"""
[node.tls]
certificate = "{cert}"
key = "{key}"
[storage]
database_url = "postgresql://cxrd:hunter2@db/cxrd"
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "h"
port = 104
[destinations.tls]
"""
    config = validate(tomllib.loads(text), base_dir=tmp_path)
    view = describe(config)
    dumped = json.dumps(view)
    assert json.loads(dumped) == view
    assert "SECRET" not in dumped
    assert "hunter2" not in dumped
    assert view["node"]["tls"]["key"] == str(key)
    assert view["storage"]["spool_dir"] == str(tmp_path / "cxrd-data" / "spool")
    assert view["results"]["results_dir"] == str(tmp_path / "cxrd-data" / "results")
    assert view["destinations"][0]["tls"]["ca"] is None
    assert view["source"] is None


def test_describe_covers_every_section(tmp_path: Path) -> None:
    view = describe(default_config(tmp_path))
    for f in dataclasses.fields(Config):
        assert f.name in view


def test_parametric_map_is_refused_with_the_reason() -> None:
    from cxrd.config import validate
    from cxrd.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        validate({"results": {"parametric_map": True}})
    assert any("results.parametric_map" in p and "frame of reference" in p
               for p in err.value.problems)


def test_workers_processes_auto_and_integer(tmp_path: Path) -> None:
    auto = load_config(write(tmp_path / "a.toml", '[workers]\nprocesses = "auto"\n'), env={})
    assert auto.workers.processes is None
    assert worker_processes(auto) == max(1, usable_cpus())
    assert worker_threads(auto) == max(1, usable_cpus() // worker_processes(auto))
    extra = load_config(write(tmp_path / "b.toml",
                              '[node]\nreceivers = 2\n[workers]\nprocesses = "auto"\n'), env={})
    assert worker_processes(extra) == max(1, usable_cpus() - 1)
    fixed = load_config(write(tmp_path / "c.toml",
                              "[workers]\nprocesses = 3\n[model]\nintra_op_threads = 2\n"),
                        env={})
    assert (worker_processes(fixed), worker_threads(fixed)) == (3, 2)
    # 0: a receiving node whose jobs are done by other nodes' `cxrd worker`
    none = load_config(write(tmp_path / "e.toml", "[workers]\nprocesses = 0\n"), env={})
    assert none.workers.processes == 0
    assert (worker_processes(none), worker_threads(none)) == (0, max(1, usable_cpus()))
    with pytest.raises(ConfigError, match="workers.processes"):
        load_config(write(tmp_path / "d.toml", '[workers]\nprocesses = "all"\n'), env={})


def test_require_cuda_needs_the_cuda_provider(tmp_path: Path) -> None:
    ok = load_config(write(tmp_path / "a.toml", "[model]\nrequire_cuda = true\n"), env={})
    assert ok.model.require_cuda
    with pytest.raises(ConfigError, match="model.require_cuda"):
        load_config(write(tmp_path / "b.toml", '[model]\nrequire_cuda = true\n'
                          'providers = ["CPUExecutionProvider"]\n'), env={})


def test_heatmap_size_and_compression(tmp_path: Path) -> None:
    from cxrd.config import HeatmapCompression

    defaults = validate({}, base_dir=tmp_path)
    assert defaults.results.heatmap_max_side == 1024
    assert defaults.results.heatmap_compression is HeatmapCompression.NONE
    config = validate(tomllib.loads('[results]\nheatmap_max_side = 512\n'
                                    'heatmap_compression = "jpeg-baseline"\n'),
                      base_dir=tmp_path)
    assert config.results.heatmap_max_side == 512
    assert config.results.heatmap_compression is HeatmapCompression.JPEG_BASELINE
    assert config.results.heatmap_compression == "jpeg-baseline"
    assert describe(config)["results"]["heatmap_compression"] == "jpeg-baseline"
    for side in (256, 4096):
        text = f"[results]\nheatmap_max_side = {side}\n"
        assert validate(tomllib.loads(text), base_dir=tmp_path).results.heatmap_max_side == side


@pytest.mark.parametrize(("toml_text", "fragment"), [
    ("[results]\nheatmap_max_side = 255", "255 is not allowed; expected an integer from 256 "
     "to 4096"),
    ("[results]\nheatmap_max_side = 4097", "4097 is not allowed"),
    ('[results]\nheatmap_max_side = "1024"', "expected an integer"),
    ('[results]\nheatmap_compression = "jpg-baseline"',
     'one of "none", "jpeg-baseline"; did you mean "jpeg-baseline"?'),
    ("[results]\nheatmap_compression = true", "expected a string"),
])
def test_bad_heatmap_options_name_the_key(tmp_path: Path, toml_text: str, fragment: str) -> None:
    problems = problems_of(toml_text, tmp_path)
    key = "results." + toml_text.split("\n")[1].split(" =")[0]
    matching = [p for p in problems if p.startswith(f"{key}:")]
    assert matching and any(fragment in p for p in matching), problems


def test_segmenter_keys(tmp_path: Path) -> None:
    default = load_config(write(tmp_path / "a.toml", ""), env={})
    assert default.model.segmenter is None and default.model.uses_segmenter
    assert default.model.min_lung_fraction == 0.05 and default.results.segmentation
    off = load_config(write(tmp_path / "b.toml", '[model]\nsegmenter = "off"\n'
                            "min_lung_fraction = 0\n[results]\nsegmentation = false\n"),
                      env={})
    assert not off.model.uses_segmenter and off.model.segmenter is None
    assert off.model.min_lung_fraction == 0 and not off.results.segmentation
    write(tmp_path / "models" / "seg.onnx", "")
    named = load_config(write(tmp_path / "c.toml", '[model]\nsegmenter = "models/seg.onnx"\n'),
                        env={})
    assert named.model.segmenter == tmp_path / "models" / "seg.onnx"
    assert named.model.uses_segmenter


@pytest.mark.parametrize(("toml_text", "fragment"), [
    ('[model]\nsegmenter = "missing.onnx"', "does not exist"),
    ('[model]\nsegmenter = "OFF"', "does not exist"),
    ("[model]\nsegmenter = false", "expected a string"),
    ("[model]\nmin_lung_fraction = 1", "from 0 (no gate) to below 1"),
    ("[model]\nmin_lung_fraction = -0.1", "at least 0"),
    ('[model]\nmin_lung_fraction = "5%"', "expected a number"),
    ('[results]\nsegmentation = "yes"', "expected a boolean"),
])
def test_bad_segmenter_options_name_the_key(tmp_path: Path, toml_text: str,
                                            fragment: str) -> None:
    problems = problems_of(toml_text, tmp_path)
    key = toml_text.split("\n")[1].split(" =")[0]
    assert any(key in p and fragment in p for p in problems), problems


def test_lung_margin(tmp_path: Path) -> None:
    from cxrd.findings import LUNG_MARGIN

    assert validate({}, base_dir=tmp_path).results.lung_margin == LUNG_MARGIN == 0.04
    for value in ("0", "0.02", "0.25", "1"):
        text = f"[results]\nlung_margin = {value}\n"
        if value == "1":
            problems = problems_of(text, tmp_path)
            assert any(p.startswith("results.lung_margin: 1 is not allowed; expected a number "
                                    "from 0 to 0.25 (a fraction of the image side")
                       for p in problems), problems
        else:
            config = validate(tomllib.loads(text), base_dir=tmp_path)
            assert config.results.lung_margin == float(value)
    for text, fragment in (("-0.01", "-0.01 is not allowed; expected a number at least 0"),
                           ('"0.04"', "expected a number"), ("nan", "NaN is not allowed")):
        problems = problems_of(f"[results]\nlung_margin = {text}\n", tmp_path)
        assert any(p.startswith("results.lung_margin:") and fragment in p
                   for p in problems), problems


# ------------------------------------------------------------------------ [storage] store


def test_store_defaults_and_forms(tmp_path: Path) -> None:
    assert validate({}, base_dir=tmp_path).storage.store == ""
    assert validate({}, base_dir=tmp_path).storage.s3_endpoint_url == ""
    s3 = validate({"storage": {"store": "s3://cxrd-images/site-a/node",
                               "s3_endpoint_url": "https://s3.example.org:9000"}},
                  base_dir=tmp_path).storage
    assert s3.store == "s3://cxrd-images/site-a/node"
    assert s3.s3_endpoint_url == "https://s3.example.org:9000"
    # A folder resolves against the config file's folder, like every path.
    assert validate({"storage": {"store": "shared/objects"}}, base_dir=tmp_path).storage.store \
        == str(tmp_path / "shared" / "objects")


def test_store_folder_that_is_a_file(tmp_path: Path) -> None:
    write(tmp_path / "objects", "x")
    problems = problems_of('[storage]\nstore = "objects"', tmp_path)
    assert any(p.startswith("storage.store:") and "not a directory" in p for p in problems)


@pytest.mark.parametrize("key", ["aws_access_key_id", "aws_secret_access_key",
                                 "aws_session_token", "secret_key", "access_key",
                                 "s3_password", "credentials", "profile"])
def test_credentials_in_storage_are_refused(tmp_path: Path, key: str) -> None:
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    problems = problems_of(f'[storage]\nstore = "s3://bucket"\n{key} = "{secret}"', tmp_path)
    mine = [p for p in problems if p.startswith(f"storage.{key}:")]
    assert len(mine) == 1, problems  # reported once, not again as an unknown key
    assert "AWS_ACCESS_KEY_ID" in mine[0] and "not read from the configuration file" in mine[0]
    assert all(secret not in p for p in problems)


def test_endpoint_with_user_and_password_is_refused_and_masked(tmp_path: Path) -> None:
    problems = problems_of(
        '[storage]\ns3_endpoint_url = "http://minio:hunter22@127.0.0.1:9000"', tmp_path)
    mine = [p for p in problems if p.startswith("storage.s3_endpoint_url:")]
    assert mine and "without user or password" in mine[0]
    assert all("hunter22" not in p for p in problems)


# ------------------------------------------------------------------ STOW-RS destinations

STOW = '[[destinations]]\nname = "web"\nurl = "https://pacs.example/dicom-web"\n'


def test_stow_destination(tmp_path: Path) -> None:
    token = write(tmp_path / "token", "abc\n")
    text = (STOW + 'token_file = "token"\n[[destinations]]\nname = "basic"\n'
            'url = "http://127.0.0.1:8042/dicom-web/"\nusername = "cxrd"\n'
            'password_env = "PACS_PASSWORD"\n[[destinations]]\nname = "dimse"\n'
            'ae_title = "PACS"\nhost = "h"\nport = 104\n')
    config = validate(tomllib.loads(text), base_dir=tmp_path)
    web, basic, dimse = config.destinations
    assert web.is_stow and web.url == "https://pacs.example/dicom-web"
    assert web.token_file == token and not web.ae_title and not web.port
    assert basic.url == "http://127.0.0.1:8042/dicom-web"  # the trailing / dropped
    assert basic.username == "cxrd" and basic.password_env == "PACS_PASSWORD"
    assert not dimse.is_stow and dimse.port == 104
    # check-config shows where the secrets are, never a secret
    view = json.dumps(describe(config))
    assert str(token) in view and "abc" not in view


@pytest.mark.parametrize(("extra", "key", "fragment"), [
    ('ae_title = "P"\nhost = "h"\nport = 104\n', "destinations[0].ae_title",
     "either STOW-RS (url) or C-STORE (ae_title, host, port), not both"),
    ('port = 104\n', "destinations[0].port", "not both"),
    ('token = "abc"\n', "destinations[0].token",
     "secrets are not written in the configuration file"),
    ('password = "abc"\nusername = "u"\n', "destinations[0].password",
     "password_file or password_env"),
    ('token_file = "missing"\n', "destinations[0].token_file", "does not exist"),
    ('token_env = "1BAD NAME"\n', "destinations[0].token_env", "environment variable"),
    ('token_env = "T"\nusername = "u"\npassword_env = "P"\n', "destinations[0].username",
     "choose one: a bearer token or basic auth"),
    ('username = "u"\n', "destinations[0].username", "needs destinations[0].password_file"),
    ('password_env = "P"\n', "destinations[0].password_env", "needs destinations[0].username"),
    ('password_env = "P"\npassword_file = "token"\nusername = "u"\n',
     "destinations[0].password_env", "not allowed with destinations[0].password_file"),
])
def test_stow_destination_problems(tmp_path: Path, extra: str, key: str,
                                   fragment: str) -> None:
    write(tmp_path / "token", "abc\n")
    problems = problems_of(STOW + extra, tmp_path)
    matching = [p for p in problems if p.startswith(f"{key}:")]
    assert matching, f"no problem names {key}: {problems}"
    assert any(fragment in p for p in matching), f"{fragment!r} not in {matching}"
    assert "abc" not in " ".join(problems)  # an inline secret is never shown


@pytest.mark.parametrize(("url", "fragment"), [
    ("pacs.example/dicom-web", "http:// or https://"),
    ("ftp://pacs.example/dicom-web", "http:// or https://"),
    ("https://user:pw@pacs.example/dicom-web", "without user or password"),
    ("https://pacs.example/dicom-web/studies", "without /studies (cxrd adds it)"),
    ("https://pacs.example/dicom-web?x=1", "without query or fragment"),
    ("https://pacs.example:99999/dicom-web", "http:// or https://"),
    ("http://[::1]:8042/dicom-web", "not an IPv6 literal"),
])
def test_stow_url_problems(tmp_path: Path, url: str, fragment: str) -> None:
    problems = problems_of(f'[[destinations]]\nname = "web"\nurl = "{url}"\n', tmp_path)
    assert len(problems) == 1 and problems[0].startswith("destinations[0].url:"), problems
    assert fragment in problems[0]
    assert "pw@" not in problems[0]  # a password in the URL is masked


def test_destination_without_url_or_address_and_stow_keys_on_c_store(tmp_path: Path) -> None:
    problems = problems_of('[[destinations]]\nname = "p"\n', tmp_path)
    assert problems == ["destinations[0].url: missing; a destination needs url (STOW-RS: "
                        "the DICOMweb base URL) or ae_title, host and port (C-STORE)"]
    problems = problems_of('[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\n'
                           'port = 104\ntoken_env = "T"\n', tmp_path)
    assert len(problems) == 1 and problems[0].startswith("destinations[0].token_env: applies "
                                                         "only to a STOW-RS destination")
    write(tmp_path / "ca.pem", "x")
    problems = problems_of(STOW.replace("https", "http") + 'tls = { ca = "ca.pem" }\n',
                           tmp_path)
    assert problems == ["destinations[0].tls: applies to an https:// url; "
                        "destinations[0].url is http://"]


def test_dicomweb_is_off_by_default_and_needs_a_token_file_when_on(tmp_path: Path) -> None:
    from cxrd.config import DEFAULT_MAX_REQUEST_MB

    config = default_config(tmp_path)
    assert not config.dicomweb.enabled and config.dicomweb.token_file is None
    assert config.dicomweb.max_request_mb == DEFAULT_MAX_REQUEST_MB
    token = write(tmp_path / "stow.token", "t0ken\n")
    file = write(tmp_path / "cxrd.toml", '[dicomweb]\nlisten = "127.0.0.1:8443"\n'
                 'token_file = "stow.token"\nmax_request_mb = 64\n')
    config = load_config(file, env={})
    assert config.dicomweb.enabled and config.dicomweb.token_file == token
    assert config.dicomweb.max_request_bytes == 64 * 1024 * 1024
    assert describe(config)["dicomweb"]["enabled"] is True


@pytest.mark.parametrize(("toml_text", "key", "fragment"), [
    ('[dicomweb]\nlisten = "127.0.0.1:8443"', "dicomweb.token_file", "no token, no entry"),
    ('[dicomweb]\nlisten = "127.0.0.1:8443"\ntoken_file = ""', "dicomweb.token_file",
     "required"),
    ('[dicomweb]\nlisten = "127.0.0.1:8443"\ntoken_file = "."',
     "dicomweb.token_file", "is not a file"),
    ('[dicomweb]\nlisten = "8443"\ntoken_file = "t"', "dicomweb.listen", "host:port"),
    ('[dicomweb]\nlisten = "0.0.0.0:11112"\ntoken_file = "t"', "dicomweb.listen",
     "DICOM port"),
    ('[dicomweb]\nlisten = "127.0.0.1:9464"\ntoken_file = "t"', "dicomweb.listen",
     "metrics.listen"),
    ('[dicomweb]\nlisten = "127.0.0.1:8443"\ntoken_file = "t"\nmax_request_mb = 0',
     "dicomweb.max_request_mb", "from 1 to"),
    ('[dicomweb]\ntoken = "inline"', "dicomweb.token", "token_file"),
])
def test_bad_dicomweb_values_name_the_key(tmp_path: Path, toml_text: str, key: str,
                                          fragment: str) -> None:
    write(tmp_path / "t", "token\n")
    file = write(tmp_path / "cxrd.toml", toml_text + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(file, env={})
    [line] = [p for p in err.value.problems if p.startswith(key)]
    assert fragment in line, line
    assert "inline" not in str(err.value)
