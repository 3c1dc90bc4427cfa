"""Run the layer tests on one intra-op thread (``device_switch.one_torch_thread`` says why); the
test device is set for this folder in tests/conftest.py."""

from device_switch import one_torch_thread  # noqa: F401 (an autouse fixture)
