"""Device profiles: the catalogue, user TOML files, and `fedge profiles`."""
import json

import pytest

from tests.conftest import assert_one_line_error
from toolkit.cli.main import main
from toolkit.errors import ProfileError
from toolkit.planning.profiles import ProfileCatalogue, load_profiles_toml

REQUIRED = {"rpi3b", "rpi4", "rpi5", "jetson-nano", "jetson-orin-nano", "android-mid"}

GOOD_TOML = """
[profiles.field-cam]
ram_mb = 512
gflops = 1.5
uplink_kbps = 256
downlink_kbps = 1024
int8_dot = false
ort_version = "1.16"
max_opset = 19

[profiles.rpi4]
ram_mb = 8192
gflops = 13.5
uplink_kbps = 100000
downlink_kbps = 100000
int8_dot = false
ort_version = "1.20"
max_opset = 21
"""


def test_catalogue_has_the_field_devices_with_their_runtime_limits():
    cat = ProfileCatalogue.load()
    assert REQUIRED <= set(cat.names())
    nano = cat.get("jetson-nano")
    assert (nano.ort_version, nano.max_opset, nano.python) == ("1.10", 15, "3.6")
    assert cat.get("rpi5").int8_dot and not cat.get("rpi4").int8_dot
    assert cat.get("android-mid").mobile
    for p in cat.profiles.values():
        assert p.ram_mb > 0 and p.gflops > 0 and p.uplink_kbps > 0 and p.source


def test_profiles_json_lists_required_fields(capsys):
    assert main(["profiles", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert REQUIRED <= {r["name"] for r in rows}
    for r in rows:
        for key in ("name", "ram_mb", "gflops", "uplink_kbps", "max_opset"):
            assert key in r


def test_user_toml_adds_and_overrides(tmp_path, capsys):
    f = tmp_path / "fleet.toml"
    f.write_text(GOOD_TOML)
    cat = ProfileCatalogue.load(f)
    assert cat.get("field-cam").max_opset == 19
    assert cat.get("rpi4").ram_mb == 8192  # overridden
    assert main(["profiles", "--json", "--profiles-file", str(f)]) == 0
    names = [r["name"] for r in json.loads(capsys.readouterr().out)]
    assert "field-cam" in names and names.count("rpi4") == 1


@pytest.mark.parametrize("body, needle", [
    ("[profiles.x\nram_mb = 1", "not valid TOML"),
    (GOOD_TOML.replace("ram_mb = 512", "ram_mb = 'lots'"),
     "profiles.field-cam.ram_mb: expected int, got str"),
    ("[profiles.x]\nram_mb = 512\n", "missing field 'gflops'"),
    (GOOD_TOML.replace("max_opset = 19", "max_opset = 19\ncolour = 'red'"),
     "unknown field 'colour'"),
    ("title = 'no profiles'", "expected a [profiles.<name>] table"),
    (GOOD_TOML.replace("gflops = 1.5", "gflops = -1.5"), "expected a positive finite number"),
    # TOML's nan and inf: nan passes every comparison, inf shrinks every other device.
    (GOOD_TOML.replace("gflops = 1.5", "gflops = nan"),
     "profiles.field-cam.gflops: expected a positive finite number, got nan"),
    (GOOD_TOML.replace("gflops = 1.5", "gflops = inf"),
     "profiles.field-cam.gflops: expected a positive finite number, got inf"),
    (GOOD_TOML.replace("gflops = 1.5", "gflops = 1.5\nrtt_ms = -inf"),
     "profiles.field-cam.rtt_ms: expected a positive finite number, got -inf"),
])
def test_malformed_toml_is_one_line_error_naming_the_problem(tmp_path, capsys, body, needle):
    f = tmp_path / "bad.toml"
    f.write_text(body)
    with pytest.raises(ProfileError, match="bad.toml"):
        load_profiles_toml(f)
    code = main(["profiles", "--profiles-file", str(f)])
    assert_one_line_error(code, capsys.readouterr().err, 2, needle)


def test_unknown_profile_names_the_valid_ones():
    with pytest.raises(ProfileError, match="unknown device profile 'rpi9'.*rpi4"):
        ProfileCatalogue.load().select("rpi4,rpi9")
