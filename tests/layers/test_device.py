"""Issue 15 item 9: the layer tests make their layers and inputs on NORMLAB_TEST_DEVICE (the CPU
unless it names a GPU), as the conformance harness does."""

import torch
from device_switch import TEST_DEVICE, generator
from variant_helpers import sample

import normlab


def test_item_9_layers_and_inputs_of_the_layer_tests_are_made_on_the_test_device():
    layer = normlab.BatchRenorm2d(3)
    assert {t.device.type for t in (*layer.parameters(), *layer.buffers())} == {TEST_DEVICE.type}
    assert sample((4, 3, 2, 2), seed=0).device.type == TEST_DEVICE.type
    assert torch.randn(2, generator=generator(0)).device.type == TEST_DEVICE.type
