"""The checksum stored with every checkpoint array (`run_checkpoint.fingerprint`), tested on the function itself:
one flipped bit anywhere changes it, and so does moving a value to another position along any axis (the
element's flat index must weigh every axis by its stride, or `a[0, 1]` and `a[1, 0]` would count the same)."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from flax_gpt2.checkpoints import run_folders as run_checkpoint


def _checksum(x) -> int:
    return run_checkpoint.fingerprint({"x": jnp.asarray(x)})["['x']"]


def _distinct(shape, dtype=np.float32):
    """Every element a different value (a swap of any two is a real change of the array)."""
    return (np.arange(np.prod(shape)).reshape(shape) * 1.25 + 0.5).astype(dtype)


def _swapped(x, a, b):
    y = x.copy()
    y[a], y[b] = x[b], x[a]
    return y


@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 4)], ids=str)
def test_swapping_any_two_elements_changes_the_checksum(shape):
    """Every transposition of two elements, in arrays of one, two and three axes."""
    x = _distinct(shape)
    indices = list(itertools.product(*map(range, shape)))
    variants = [_swapped(x, a, b) for a, b in itertools.combinations(indices, 2)]
    # One jitted call over every variant (a pytree of them), not one compile each.
    sums = run_checkpoint.fingerprint([jnp.asarray(x)] + [jnp.asarray(v) for v in variants])
    values = list(sums.values())
    assert all(v != values[0] for v in values[1:]), [
        pair for pair, v in zip(itertools.combinations(indices, 2), values[1:]) if v == values[0]]


def test_transposed_neighbours_are_told_apart():
    """The swaps a stride-blind index maps to the same position: (0, 1) <-> (1, 0), and a square array
    against its transpose."""
    x = _distinct((4, 4))
    assert _checksum(_swapped(x, (0, 1), (1, 0))) != _checksum(x)
    assert _checksum(x.T.copy()) != _checksum(x)
    y = _distinct((2, 2, 2))
    assert len({_checksum(_swapped(y, a, b)) for a, b in [((0, 0, 1), (0, 1, 0)), ((0, 1, 0), (1, 0, 0)),
                                                           ((0, 0, 1), (1, 0, 0))]} | {_checksum(y)}) == 4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "uint8", "bool"])
def test_swap_and_bit_flip_in_every_dtype_a_checkpoint_holds(dtype):
    x = np.asarray(jnp.asarray(np.arange(24).reshape(4, 6) % 7 + 1).astype(dtype))
    if dtype == "bool":
        x = (np.arange(24).reshape(4, 6) % 3 == 0)
    a, b = (0, 1), (1, 0)
    assert x[a] != x[b]
    assert _checksum(_swapped(x, a, b)) != _checksum(x)
    if dtype != "bool":
        raw = x.view(np.uint8 if x.dtype.itemsize == 1 else np.uint16 if x.dtype.itemsize == 2 else np.uint32)
        flipped = raw.copy()
        flipped[2, 3] ^= 1 << (8 * x.dtype.itemsize - 1)  # the top bit
        assert _checksum(flipped.view(x.dtype)) != _checksum(x)


@pytest.mark.parametrize("bit", [0, 1, 7, 22, 23, 30, 31])
def test_one_flipped_bit_at_any_position_changes_the_checksum(bit):
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    reference = _checksum(x)
    for index in [(0, 0), (3, 5), (7, 15)]:
        y = x.copy()
        y.view(np.uint32)[index] ^= np.uint32(1 << bit)
        assert _checksum(y) != reference, (bit, index)


def test_checksums_are_keyed_by_leaf_path_and_verify_names_the_bad_array():
    tree = {"params": {"a": jnp.ones((3,)), "b": jnp.arange(4.0)}, "count": jnp.int32(5)}
    sums = run_checkpoint.fingerprint(tree)
    assert set(sums) == {"['count']", "['params']['a']", "['params']['b']"}
    run_checkpoint.verify(tree, sums, "here")
    bad = {**tree, "params": {**tree["params"], "b": jnp.asarray([0.0, 1.0, 3.0, 2.0])}}
    with pytest.raises(run_checkpoint.ChecksumMismatchError, match=r"here: 1 array.*\['params'\]\['b'\]"):
        run_checkpoint.verify(bad, sums, "here")
