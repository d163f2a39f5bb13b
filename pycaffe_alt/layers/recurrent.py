"""Caffe's recurrent layers: ``RNN``, ``LSTM`` (``recurrent_param``) and ``LSTMUnit``.

Caffe builds a recurrent layer as an unrolled net of ordinary layers (recurrent_layer.cpp,
rnn_layer.cpp, lstm_layer.cpp); here the same computation is a loop over the time steps, with
the same parameters, the same order of operations and the same state semantics:

* Bottoms: ``x`` of shape (T, N, ...) (T time steps of N independent streams), ``cont`` of shape
  (T, N) (0 starts a new sequence in that stream, 1 continues it), an optional static input
  ``x_static`` (N, ...) added at every step, and with ``expose_hidden`` the initial state
  (``h_0``; for LSTM ``h_0`` then ``c_0``, each (1, N, num_output)).
* Tops: the output of every step (T, N, num_output) (RNN ``o``, LSTM ``h``), and with
  ``expose_hidden`` the final state (``h_T``; LSTM ``h_T`` then ``c_T``).
* State: without ``expose_hidden`` a forward starts from the state the previous forward ended
  with (zeros at first), as Caffe copies its recurrent outputs into its recurrent inputs; only
  ``cont = 0`` resets a stream. Gradients do not flow across forwards (Caffe zeroes those
  diffs), nor into exposed initial-state bottoms or out of exposed final-state tops (Caffe
  shares their data only). The time-step count T is fixed at setup; the stream count N may change (the state
  then restarts at zero).
* Per step, RNN: ``h_t = tanh(W_hh (cont_t h_{t-1}) + W_xh x_t + b_h [+ W_xh_static x_static])``,
  ``o_t = tanh(W_ho h_t + b_o)``. LSTM: ``gates = W_hc (cont_t h_{t-1}) + W_xc x_t + b_c
  [+ W_xc_static x_static]``, then :func:`lstm_unit`. The sums run in Caffe's Eltwise order.
* Parameters, in Caffe's order: RNN ``W_xh (H, D), b_h, [W_xh_static], W_hh (H, H), W_ho (H, H),
  b_o``; LSTM ``W_xc (4H, D), b_c (4H), [W_xc_static (4H, D_static)], W_hc (4H, H)``. Caffe's
  unrolled net fills the shared recurrent weights once per time step (every step's
  InnerProduct fills its own blob before it is shared, Net::Init), so the random stream advances
  T times for them; the fill here draws the same numbers, so seeded initialisation matches.

Exporting (ONNX, TorchScript, torch.export, PyTorch code) stops at these layers with a message
(docs/convert.md); ``torch.compile`` traces them (one graph, the loop unrolled).

``LSTMUnit`` is Caffe's gate layer on its own (bottoms ``c_prev`` (1, N, H), gates (1, N, 4H),
``cont`` (1, N); tops ``c``, ``h``), with Caffe's gate order input, forget, output, candidate and
its hand-written backward.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..fillers import fill
from ..registry import LAYERS
from .base import Layer, Shape
from .structure import count, filler_or_default


class _LSTMUnitFn(torch.autograd.Function):
    """Caffe's LSTMUnit forward and backward (lstm_unit_layer.cpp).

    ``f = cont * sigmoid(x_f)``; the backward uses ``f (1 - f)`` as Caffe does (the exact
    derivative for the 0/1 ``cont`` values sequences use). No gradient reaches ``cont``.
    """

    @staticmethod
    def forward(ctx, c_prev: torch.Tensor, gates: torch.Tensor, cont: torch.Tensor):
        i, f, o, g = _gate_values(gates, cont)
        c = f * c_prev + i * g
        h = o * torch.tanh(c)
        ctx.save_for_backward(c_prev, gates, cont, c)
        return c, h

    @staticmethod
    def backward(ctx, c_diff: torch.Tensor, h_diff: torch.Tensor):
        c_prev, gates, cont, c = ctx.saved_tensors
        i, f, o, g = _gate_values(gates, cont)
        tanh_c = torch.tanh(c)
        c_term = c_diff + h_diff * o * (1 - tanh_c * tanh_c)
        gates_diff = torch.cat([c_term * g * i * (1 - i), c_term * c_prev * f * (1 - f),
                                h_diff * tanh_c * o * (1 - o), c_term * i * (1 - g * g)], dim=-1)
        return c_term * f, gates_diff, None


def _gate_values(gates: torch.Tensor, cont: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Input, forget (times ``cont``), output and candidate gate values of (1, N, 4H) gates."""
    x_i, x_f, x_o, x_g = gates.chunk(4, dim=-1)
    return (torch.sigmoid(x_i), cont.unsqueeze(-1) * torch.sigmoid(x_f), torch.sigmoid(x_o),
            torch.tanh(x_g))


def lstm_unit(c_prev: torch.Tensor, gates: torch.Tensor,
              cont: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step as Caffe's LSTMUnit: ``(c, h)`` from the previous cell state (1, N, H), the
    gate inputs (1, N, 4H) in the order input, forget, output, candidate, and ``cont`` (1, N)."""
    return _LSTMUnitFn.apply(c_prev, gates, cont.detach().to(gates.dtype))


@LAYERS.register("LSTMUnit")
class LSTMUnit(Layer):
    """Caffe's LSTMUnit: bottoms ``c_prev`` (1, N, H), gates (1, N, 4H), ``cont`` (1, N); tops
    ``c`` and ``h`` (1, N, H). See :func:`lstm_unit`."""

    num_bottoms = (3, 3)
    num_tops = (2, 2)
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self._check(bottom_shapes)

    def _check(self, shapes: Sequence[Shape]) -> None:
        c_prev, gates, cont = (tuple(int(d) for d in s) for s in shapes)
        n = c_prev[1] if len(c_prev) > 1 else -1
        for what, shape, axes in (("c_prev", c_prev, 3), ("gates", gates, 3), ("cont", cont, 2)):
            if len(shape) != axes or shape[0] != 1 or shape[1] != n:
                raise self.error(f"bottom {what} has shape {shape}; LSTMUnit takes c_prev "
                                 f"(1, N, H), gates (1, N, 4H) and cont (1, N)",
                                 "one time step of N streams: slice the sequence first")
        if gates[2] != 4 * c_prev[2]:
            raise self.error(f"gates have {gates[2]} values per stream, expected 4 x {c_prev[2]} "
                             "(input, forget, output, candidate)",
                             "make the gate InnerProduct's num_output 4 x the hidden size")

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 2  # Caffe: "Cannot backpropagate to sequence indicators."

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        self._check(bottom_shapes)
        return [tuple(bottom_shapes[0])] * 2

    def forward(self, c_prev: torch.Tensor, gates: torch.Tensor, cont: torch.Tensor):
        self._check([c_prev.shape, gates.shape, cont.shape])
        return lstm_unit(c_prev, gates, cont)


class _Recurrent(Layer):
    """What RNN and LSTM share: bottoms, tops, parameters, the carried state (module notes)."""

    num_bottoms = (2, 5)
    num_tops = (1, 3)
    state_names: Tuple[str, ...] = ()  # the recurrent state blobs, in Caffe's order
    gate_factor = 1                    # rows of the input transform per hidden unit

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.recurrent_param
        self.num_output = int(p.num_output)
        if self.num_output <= 0:
            raise self.error("needs num_output > 0", "set recurrent_param { num_output: N }")
        self.expose_hidden = bool(p.expose_hidden)
        shapes = [tuple(s) for s in bottom_shapes]
        exposed = len(self.state_names) if self.expose_hidden else 0
        self.static_input = len(shapes) > 2 + exposed
        want_bottoms = 2 + int(self.static_input) + exposed
        if len(shapes) != want_bottoms or len(param.top) != 1 + exposed:
            raise self.error(
                f"takes bottoms x, cont{', x_static' if self.static_input else ''}"
                f"{''.join(', ' + n for n in self.state_names) if self.expose_hidden else ''} and "
                f"{1 + exposed} top(s); got {len(shapes)} bottom(s) and {len(param.top)} top(s)",
                "with recurrent_param { expose_hidden: true } the initial state comes in as "
                f"bottoms ({', '.join(self.state_names)}) and the final state goes out as tops")
        x = shapes[0]
        if len(x) < 2:
            raise self.error(f"bottom x has shape {x}; it needs at least 2 axes (T, N, ...)",
                             "time steps first, then streams")
        self.T = int(x[0])
        self._check_shapes(shapes)
        self.input_dim = count(x, 2)
        gates = self.gate_factor * self.num_output
        weight = filler_or_default(self, p, "weight_filler")
        bias = filler_or_default(self, p, "bias_filler")
        self._input_names = self._input_blob_names()
        self.add_blob((gates, self.input_dim), weight, self._input_names[0])
        self.add_blob((gates,), bias, self._input_names[1])
        if self.static_input:
            self.add_blob((gates, count(shapes[2], 1)), weight, self._input_names[2])
        self._add_step_blobs(weight, bias)
        self._state: Optional[Tuple[torch.Tensor, ...]] = None

    # -- set-up helpers --------------------------------------------------------------------
    def _input_blob_names(self) -> Tuple[str, str, str]:
        raise NotImplementedError

    def _add_step_blobs(self, weight, bias) -> None:
        """Add the per-step blobs and advance the filler stream as Caffe's T fills do."""
        raise NotImplementedError

    def _refill(self, shape: Sequence[int], filler) -> None:
        """Draw (and drop) one more fill of ``shape``: a later time step's copy of a shared blob."""
        fill(torch.empty(tuple(shape)), filler)

    def _check_shapes(self, shapes: Sequence[Shape]) -> None:
        x, cont = shapes[0], shapes[1]
        if len(x) < 2 or x[0] != self.T:
            raise self.error(f"bottom x has shape {tuple(x)}: {x[0] if x else 0} time steps, "
                             f"the layer was set up for {self.T}",
                             "the number of time steps (axis 0) cannot change after setup")
        n = x[1]
        if tuple(cont) != (self.T, n):
            raise self.error(f"bottom cont has shape {tuple(cont)}, expected (T, N) = "
                             f"{(self.T, n)}", "one 0/1 sequence indicator per time step and "
                             "stream")
        rest = list(shapes[2:])
        if self.static_input:
            static = rest.pop(0)
            if len(static) < 1 or static[0] != n:
                raise self.error(f"static input has shape {tuple(static)}, expected (N, ...) "
                                 f"with N = {n}", "one static vector per stream")
        for name, shape in zip(self.state_names, rest):
            if tuple(shape) != (1, n, self.num_output):
                raise self.error(f"bottom {name} has shape {tuple(shape)}, expected "
                                 f"{(1, n, self.num_output)}", "the state of one time step: "
                                 "(1, N, num_output)")

    def allow_force_backward(self, bottom_index: int) -> bool:
        # x and x_static only: no gradient into cont ("Cannot backpropagate to sequence
        # indicators."), nor into an exposed initial state (Caffe shares its data, not its diff).
        return bottom_index == 0 or (self.static_input and bottom_index == 2)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        self._check_shapes([tuple(s) for s in bottom_shapes])
        n = int(bottom_shapes[0][1])
        exposed = len(self.state_names) if self.expose_hidden else 0
        return [(self.T, n, self.num_output)] + [(1, n, self.num_output)] * exposed

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, cont: torch.Tensor, *rest: torch.Tensor):
        self._check_shapes([x.shape, cont.shape] + [r.shape for r in rest])
        n = x.shape[1]
        rest = list(rest)
        static = rest.pop(0) if self.static_input else None
        if self.expose_hidden:
            state = tuple(r.detach() for r in rest)
        else:
            state = self._state
            if state is None or state[0].shape[1] != n or state[0].device != x.device:
                state = tuple(x.new_zeros(1, n, self.num_output) for _ in self.state_names)
        w_in, b_in = self.blobs[0], self.blobs[1]
        # All steps' input transforms at once (Caffe's "x_transform" InnerProduct, axis 2).
        x_in = F.linear(x.reshape(self.T, n, self.input_dim), w_in, b_in)
        static_in = None
        if static is not None:
            static_in = F.linear(static.reshape(n, -1), self.blobs[2]).reshape(1, n, -1)
        cont = cont.detach().to(x.dtype)
        outputs, state = self._steps(x_in, static_in, cont, state)
        if not self.expose_hidden:
            # The next forward starts here; no gradient crosses forwards.
            self._state = tuple(s.detach() for s in state)
        out = torch.cat(outputs, dim=0)
        # The exposed final state shares Caffe's data, not its diff: no gradient comes back.
        return (out,) + tuple(s.detach() for s in state) if self.expose_hidden else out

    def _step_input(self, recurrent: torch.Tensor, x_t: torch.Tensor,
                    static_in: Optional[torch.Tensor]) -> torch.Tensor:
        # Caffe's Eltwise SUM: the recurrent term first, then the input, then the static one.
        s = recurrent + x_t
        return s if static_in is None else s + static_in

    def _steps(self, x_in, static_in, cont, state):
        raise NotImplementedError

    @property
    def replays_exactly(self) -> bool:
        # Without expose_hidden a forward starts from the state the previous one left and
        # stores its own (Caffe's RecurrentLayer::Forward_cpu copies h_T into h_0): running it
        # again for a second backward would start from this pass's end and move the state on.
        return self.expose_hidden

    def reset_state(self) -> None:
        """Forget the carried state: the next forward starts from zeros (Caffe's ``Reset``)."""
        self._state = None

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_output={self.num_output}, T={self.T}, "
                f"static_input={self.static_input}, expose_hidden={self.expose_hidden}")


@LAYERS.register("RNN")
class RNN(_Recurrent):
    """Caffe's RNN layer (tanh hidden and output units); see the module notes."""

    state_names = ("h_0",)

    def _input_blob_names(self):
        return ("W_xh", "b_h", "W_xh_static")

    def _add_step_blobs(self, weight, bias) -> None:
        h = self.num_output
        self.add_blob((h, h), weight, "W_hh")
        self.add_blob((h, h), weight, "W_ho")
        self.add_blob((h,), bias, "b_o")
        for _ in range(self.T - 1):  # steps 2..T: W_hh, W_ho, b_o, in that order
            self._refill((h, h), weight)
            self._refill((h, h), weight)
            self._refill((h,), bias)

    def _steps(self, x_in, static_in, cont, state):
        w_hh, w_ho, b_o = self.blobs[-3:]
        (h,) = state
        outputs = []
        for t in range(self.T):
            h_conted = h * cont[t].view(1, -1, 1)
            h = torch.tanh(self._step_input(F.linear(h_conted, w_hh), x_in[t:t + 1], static_in))
            outputs.append(torch.tanh(F.linear(h, w_ho, b_o)))
        return outputs, (h,)


@LAYERS.register("LSTM")
class LSTM(_Recurrent):
    """Caffe's LSTM layer (gates input, forget, output, candidate); see the module notes."""

    state_names = ("h_0", "c_0")
    gate_factor = 4

    def _input_blob_names(self):
        return ("W_xc", "b_c", "W_xc_static")

    def _add_step_blobs(self, weight, bias) -> None:
        shape = (4 * self.num_output, self.num_output)
        self.add_blob(shape, weight, "W_hc")
        for _ in range(self.T - 1):
            self._refill(shape, weight)

    def _steps(self, x_in, static_in, cont, state):
        w_hc = self.blobs[-1]
        h, c = state
        outputs = []
        for t in range(self.T):
            cont_t = cont[t:t + 1]
            h_conted = h * cont_t.unsqueeze(-1)
            gates = self._step_input(F.linear(h_conted, w_hc), x_in[t:t + 1], static_in)
            c, h = lstm_unit(c, gates, cont_t)
            outputs.append(h)
        return outputs, (h, c)
