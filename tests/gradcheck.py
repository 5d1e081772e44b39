"""Central finite differences in float64, shared by the gradient-check tests."""
import numpy as np


def sample_indices(shape, max_samples, rng):
    """All flat indices of a small tensor, or `max_samples` of them drawn at random."""
    size = int(np.prod(shape))
    if size <= max_samples:
        return np.arange(size)
    return rng.choice(size, max_samples, replace=False)


def numerical_grad(loss_fn, x, indices, eps=1e-5):
    """d loss / d x.flat[i] for i in indices, by 4th-order central differences.

    The 4th-order stencil keeps truncation error near float64 round-off, so agreement to
    1e-6 relative is a real test of the analytic gradient, not of the step size.
    """
    flat = x.reshape(-1)
    grads = np.empty(len(indices))
    for n, i in enumerate(indices):
        saved = flat[i]
        values = []
        for step in (2 * eps, eps, -eps, -2 * eps):
            flat[i] = saved + step
            values.append(float(loss_fn()))
        flat[i] = saved
        f2, f1, fm1, fm2 = values
        grads[n] = (8 * (f1 - fm1) - (f2 - fm2)) / (12 * eps)
    return grads


def max_relative_error(analytic, numeric):
    """max_i |a_i - n_i| / max(|a_i|, |n_i|, floor), floor = 1e-3 * max |n|.

    The floor keeps elements whose true gradient is ~0 from dividing round-off by ~0.
    """
    analytic = np.asarray(analytic, dtype=np.float64)
    numeric = np.asarray(numeric, dtype=np.float64)
    floor = max(1e-3 * np.abs(numeric).max(), 1e-12)
    denom = np.maximum(np.maximum(np.abs(analytic), np.abs(numeric)), floor)
    return float((np.abs(analytic - numeric) / denom).max())


def check_gradients(forward, backward, inputs, rng, tol=1e-6, max_samples=40):
    """Compares backward's gradients of sum(forward()[0] * R), R random, for every array in
    `inputs` (a name -> array dict, perturbed in place) against finite differences.
    `backward(cache, d_out)` returns a name -> gradient dict."""
    out, cache = forward()
    weights = rng.normal(size=np.shape(out))
    analytic = backward(cache, weights.astype(out.dtype) if np.ndim(out) else float(weights))

    def loss():
        return float(np.sum(forward()[0] * weights))

    for name, array in inputs.items():
        idx = sample_indices(array.shape, max_samples, rng)
        numeric = numerical_grad(loss, array, idx)
        error = max_relative_error(analytic[name].reshape(-1)[idx], numeric)
        assert error < tol, f"{name}: max relative error {error:.2e}"


def model_gradient_errors(params, cfg, ids, targets, rng, max_samples):
    """{tensor name: max relative error} of gpt.backward against finite differences of
    gpt.forward's loss, over up to `max_samples` random elements of every tensor."""
    from models import gpt
    _, cache = gpt.forward(params, cfg, ids, targets)
    grads = gpt.backward(cache, params.like())
    errors = {}
    for name in params:
        sample = sample_indices(params[name].shape, max_samples, rng)
        numeric = numerical_grad(lambda: gpt.forward(params, cfg, ids, targets)[0],
                                 params[name], sample, eps=1e-3)
        errors[name] = max_relative_error(grads[name].reshape(-1)[sample], numeric)
    return errors
