"""Public signatures carry annotation objects, as Optax's do, not strings."""

import inspect

import optax
import pytest

import optax_snr


def _public_callables():
    for name in optax_snr.__all__:
        obj = getattr(optax_snr, name)
        if callable(obj):
            yield name, obj


@pytest.mark.parametrize(("name", "obj"), list(_public_callables()))
def test_annotations_are_objects(name, obj):
    signature = inspect.signature(obj)
    for parameter in signature.parameters.values():
        assert not isinstance(parameter.annotation, str), (name, parameter.name)
    assert not isinstance(signature.return_annotation, str), name


@pytest.mark.parametrize(
    "name", ["adam", "adamw", "nadam", "nadamw", "amsgrad", "adabelief", "ademamix", "adopt"]
)
def test_learning_rate_is_optax_s_scalar_or_schedule(name):
    # Optax's tests look for this annotation to decide whether to test schedules.
    annotation = inspect.signature(getattr(optax_snr, name)).parameters["learning_rate"].annotation
    assert annotation == optax.ScalarOrSchedule


def test_adopt_learning_rate_annotation():
    annotation = inspect.signature(optax_snr.adopt).parameters["learning_rate"].annotation
    assert annotation is optax.ScalarOrSchedule
