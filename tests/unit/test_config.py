"""The node and lab TOML loaders: a good file gives the node it says; a bad one gives one
sentence naming the file, the key and what is wrong."""

import socket

import pytest

from stack import cli
from stack.config import ConfigError, load_node
from stack.lab.topology import load_lab
from stack.net.node import Node

GOOD_NODE = """
name = "r1"
netns = "lab-sw"
forwarding = true
[[interface]]
name = "lan"
addresses = ["192.168.1.1/24", "192.168.2.1/24"]
[[interface]]
name = "wan"
tap = "r1-wan"
mtu = 1400
addresses = ["203.0.113.1/24"]
[[route]]
to = "default"
via = "203.0.113.254"
[[route]]
to = "10.0.0.0/8"
dev = "lan"
metric = 5
[services]
http = false
"""


def write(tmp_path, text: str, name: str = "f.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_good_node_file_builds_that_node(tmp_path):
    spec = load_node(write(tmp_path, GOOD_NODE))
    assert spec.netns == "lab-sw" and spec.http_port is None and spec.echo
    assert [link.tap for link in spec.links] == ["r1-lan", "r1-wan"]
    node = Node(spec.node)
    assert node.forwarding and [i.mtu for i in node.interfaces] == [1500, 1400]
    lookup = node.routes.lookup
    assert lookup(socket.inet_aton("8.8.8.8")).gateway == socket.inet_aton("203.0.113.254")
    assert node.interfaces[lookup(socket.inet_aton("10.1.2.3")).ifindex].name == "lan"
    assert lookup(socket.inet_aton("192.168.2.9")).source == socket.inet_aton("192.168.2.1")
    # two interfaces get different, stable, locally administered unicast MACs
    macs = [i.mac for i in node.interfaces]
    assert macs[0] != macs[1] and all(m[0] & 0x03 == 0x02 for m in macs)


@pytest.mark.parametrize(("change", "key", "what"), [
    (("forwarding = true", "forwarding = 1"), "forwarding", "must be true or false"),
    (('addresses = ["192.168.1.1/24", "192.168.2.1/24"]', 'addresses = ["192.168.1.1"]'),
     "interface[0].addresses[0]", "needs a prefix length"),
    (('addresses = ["192.168.1.1/24", "192.168.2.1/24"]', 'addresses = ["192.168.1.0/24"]'),
     "interface[0].addresses[0]", "network's own or broadcast address"),
    (("mtu = 1400", "mtu = 100"), "interface[1].mtu", "outside 576..9000"),
    (('via = "203.0.113.254"', 'via = "198.51.100.1"'), "route[0].via",
     "not on the subnet of any interface"),
    (('to = "10.0.0.0/8"', 'to = "10.1.0.0/8"'), "route[1].to", "host bits must be zero"),
    (('dev = "lan"', 'dev = "lan0"'), "route[1].dev", "no interface named lan0"),
    (('tap = "r1-wan"', 'tap = "a-name-much-too-long"'), "interface[1].tap",
     "1..15 characters"),
    (("http = false", "http = 70000"), "services.http", "port (1..65535) or false"),
    (('name = "wan"', 'name = "lan"'), "interface[1].name", "used twice"),
    (('netns = "lab-sw"', 'netns = "lab-sw"\nspeed = 10'), "speed", "not a known key"),
])
def test_bad_node_files_name_the_key(tmp_path, change, key, what):
    old, new = change
    assert old in GOOD_NODE
    path = write(tmp_path, GOOD_NODE.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load_node(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {key}: ") and what in message, message
    assert "\n" not in message


def test_run_config_errors_are_one_line_and_exit_2(tmp_path, capsys):
    path = write(tmp_path, "name = [")
    assert cli.main(["run", "--config", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tapstack: {path}: not valid TOML"), err
    assert cli.main(["run", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml: no such file" in capsys.readouterr().err


GOOD_LAB = """
name = "t1"
[[segment]]
name = "lan"
mtu = 1400
[[node]]
name = "a"
kind = "linux"
commands = ["true"]
[[node.interface]]
segment = "lan"
addresses = ["10.1.0.2/24"]
[[node]]
name = "r"
kind = "tapstack"
forwarding = true
[[node.interface]]
segment = "lan"
addresses = ["10.1.0.1/24"]
"""


def test_a_good_lab_file(tmp_path):
    lab = load_lab(write(tmp_path, GOOD_LAB))
    assert lab.switch_netns == "t1-sw" and lab.segments["lan"].bridge == "br-lan"
    a, r = lab.nodes["a"], lab.nodes["r"]
    assert lab.netns(a) == "t1-a" and lab.netns(r) == "t1-sw"
    assert a.interfaces[0].mtu == 1400  # the segment's MTU by default
    assert lab.port(r, r.interfaces[0]) == "r.eth0"


@pytest.mark.parametrize(("change", "key", "what"), [
    (('name = "t1"', 'name = "T 1"'), "name", "lower-case letters"),
    (('segment = "lan"\naddresses = ["10.1.0.2/24"]', 'segment = "wan"'),
     "node[0].interface[0].segment", "not a segment of this lab"),
    (('kind = "tapstack"', 'kind = "docker"'), "node[1].kind", "not one of tapstack, linux"),
    (('name = "r"', 'name = "a"'), "node[1].name", "used twice"),
    (('kind = "tapstack"\nforwarding = true', 'kind = "tapstack"\ncommands = ["x"]'),
     "node[1].commands", "only Linux nodes"),
    (("mtu = 1400", "mtu = 50"), "segment[0].mtu", "outside 576..9000"),
])
def test_bad_lab_files_name_the_key(tmp_path, change, key, what):
    old, new = change
    assert old in GOOD_LAB
    path = write(tmp_path, GOOD_LAB.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load_lab(path)
    assert str(err.value).startswith(f"{path}: {key}: ") and what in str(err.value), \
        str(err.value)
