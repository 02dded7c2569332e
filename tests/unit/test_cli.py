"""The CLI's option checks: one sentence on stderr, exit 2, nothing created."""

import pytest

from stack import cli


@pytest.mark.parametrize(("args", "fragment"), [
    (["--address", "10.77.0.300/24"], "--address '10.77.0.300/24' is not an IPv4 address"),
    (["--address", "10.77.0.2"], "leaves no room for a host side"),
    (["--address", "10.77.0.0/24"], "is the network's own or broadcast address"),
    (["--host-address", "10.78.0.1/24"], "must be another address in 10.77.0.0/24"),
    (["--host-address", "10.77.0.2/24"], "must be another address in 10.77.0.0/24"),
    (["--gateway", "gw"], "--gateway 'gw' is not an IPv4 address"),
    (["--mac", "01:00:5e:00:00:01"], "is a multicast address"),
    (["--mac", "nonsense"], "is not a MAC address"),
    (["--mtu", "100"], "outside 576..9000"),
])
def test_bad_options(args, fragment, capsys, monkeypatch):
    monkeypatch.setattr(cli.ns, "create_netns", lambda name: pytest.fail("created a netns"))
    assert cli.main(["run", "--netns", "never-made", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tapstack: ") and fragment in err[0], err


def test_not_root(capsys, monkeypatch):
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(cli.ns, "create_netns", lambda name: pytest.fail("created a netns"))
    assert cli.main(["run", "--netns", "never-made"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("tapstack: tapstack run needs root (TAP devices and network namespaces); "
                   "run it with sudo")


def test_defaults_match_the_design():
    args = cli._parser().parse_args(["run"])
    config, host = cli.build_config(args)
    assert (args.netns, args.tap, host) == ("tapstack", "tap0", "10.77.0.1/24")
    assert config.address == bytes([10, 77, 0, 2]) and config.prefixlen == 24
    assert config.mac == bytes.fromhex("02000a4d0002") and config.mtu == 1500
    assert config.gateway == bytes([10, 77, 0, 1])


def test_bad_zone_file_is_one_sentence(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli.ns, "create_netns", lambda name: pytest.fail("created a netns"))
    zone = tmp_path / "x.zone"
    zone.write_text("$ORIGIN x.\n$TTL 60\n@ IN A 192.0.2.1\n")
    assert cli.main(["run", "--netns", "never-made", "--dns-zone", str(zone)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tapstack: --dns-zone {zone}: the zone has no SOA record at its apex"]


def test_the_options_page_is_complete_and_current():
    """docs/options.md is written from the parser: a new option must reach it."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("options_doc", root / "tools/options_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (root / "docs" / "options.md").read_text() == module.render(), \
        "docs/options.md is stale: run python tools/options_doc.py"
