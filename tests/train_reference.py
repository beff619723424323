"""Float64 NumPy forward passes of what the training path computes, written from the ONNX
equations (independently of the C code): the reference whose central finite differences
check every C gradient."""
import numpy as np


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def clip(x, c):
    return x if c is None else np.clip(x, -c, c)


def cell_forward(spec, X, h0=None, c0=None):
    """X (T, B, I) -> Y (T, B, H), hT, cT. spec as rnnengine.train cells: kind, W, R, B, P,
    clip, linear_before_reset, relu. ONNX gate orders: LSTM i o f c, GRU z r h."""
    kind, H = spec["kind"], spec["H"]
    W, R = spec["W"].astype(np.float64), spec["R"].astype(np.float64)
    G = {"RNN": 1, "GRU": 3, "LSTM": 4}[kind]
    Bv = np.zeros(2 * G * H) if spec.get("B") is None else spec["B"].astype(np.float64)
    Wb, Rb = Bv[:G * H], Bv[G * H:]
    c_ = spec.get("clip")
    T, Bn, _ = X.shape
    h = np.zeros((Bn, H)) if h0 is None else h0.astype(np.float64)
    c = np.zeros((Bn, H)) if c0 is None else c0.astype(np.float64)
    ys = []
    for t in range(T):
        x = X[t].astype(np.float64)
        if kind == "LSTM":
            P = np.zeros(3 * H) if spec.get("P") is None else spec["P"].astype(np.float64)
            a = x @ W.T + h @ R.T + Wb + Rb
            ai, ao, af, ac = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
            i = sigmoid(clip(ai + P[:H] * c, c_))
            f = sigmoid(clip(af + P[2 * H:] * c, c_))
            g = np.tanh(clip(ac, c_))
            c = f * c + i * g
            o = sigmoid(clip(ao + P[H:2 * H] * c, c_))
            h = o * np.tanh(c)
        elif kind == "GRU":
            xz, xr, xh = np.split(x @ W.T + Wb, 3, axis=1)
            Rz, Rr, Rh = R[:H], R[H:2 * H], R[2 * H:]
            z = sigmoid(clip(xz + h @ Rz.T + Rb[:H], c_))
            r = sigmoid(clip(xr + h @ Rr.T + Rb[H:2 * H], c_))
            if spec.get("linear_before_reset"):
                n = np.tanh(clip(xh + r * (h @ Rh.T + Rb[2 * H:]), c_))
            else:
                n = np.tanh(clip(xh + (r * h) @ Rh.T + Rb[2 * H:], c_))
            h = (1 - z) * n + z * h
        else:
            pre = clip(x @ W.T + h @ R.T + Wb + Rb, c_)
            h = np.maximum(pre, 0) if spec.get("relu") else np.tanh(pre)
        ys.append(h)
    return np.stack(ys), h, c


def numeric_grad(f, arr, eps=1e-6):
    """Central finite differences of the scalar f() with respect to every entry of arr
    (a float64 array changed in place and restored)."""
    g = np.zeros_like(arr)
    it = np.nditer(arr, flags=["multi_index"])
    for _ in it:
        idx = it.multi_index
        old = arr[idx]
        arr[idx] = old + eps
        up = f()
        arr[idx] = old - eps
        down = f()
        arr[idx] = old
        g[idx] = (up - down) / (2 * eps)
    return g
