"""Which layers, which prompt positions (and which hook site): parsed once, resolved once against the model.

A command parses its ``layers``/``positions`` text with :meth:`LayerSpec.parse` / :meth:`PositionSpec.parse`
before the model loads (a typo fails at once), then resolves it once against the model (:meth:`LayerSpec.resolve`,
:meth:`PositionSpec.resolve`); the resolved tuples are what interventions and captures receive. Nothing after that
validates them again.

Conventions (one for every command):

* a list ``"8,12,16"``, a single index ``"12"`` or a **half-open** range ``"4:8"`` (= 4, 5, 6, 7, as Python's
  ``range``; taken on the numbers as written, so it needs ``a < b``);
* layers: negative indices count from the end (``-1`` = the last layer); resolved to non-negative ints in the
  order given, without repeats;
* positions: negative indices from the end of the prompt only (``-1`` = the last token), sorted, without repeats;
  or a keyword: ``post`` (the chat template's post-instruction positions), ``last`` (``-1``), ``all`` (every
  position of every pass, generated tokens included: resolved to None);
* an empty selection (``""``, ``"5:5"``, ``"3:1"``) is an error, never an empty tuple.

Normalising indices once, at the boundary, follows repeng's ``ControlModel`` (layer ids normalised on entry).
Errors are :class:`~toolkit.errors.ToolkitError` with ``param`` set to the parameter parsed (``layers``,
``positions``, ...), which the CLI prints as its flag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ToolkitError

#: position keywords of :class:`PositionSpec`
POSITION_KEYWORDS = ("post", "last", "all")


def _parse_indices(text: str, param: str, what: str) -> tuple[int, ...]:
    """``'1,2,5'``, ``'7'`` or the half-open ``'4:8'`` -> the ints as written (in order, repeats kept).

    Raises:
        ToolkitError (``param``): not integers, or a selection that names nothing.
    """
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            values = tuple(range(int(a), int(b)))
        else:
            values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ToolkitError(f"must be integers like '1,2,5' or '4:8', got {text!r}", param=param) from None
    if not values:
        raise ToolkitError(f"{text!r} names no {what} (a range a:b is half-open: it needs a < b)", param=param)
    return values


@dataclass(frozen=True)
class LayerSpec:
    """A selection of decoder layers as the user wrote it, parsed (module docstring for the syntax).

    Attributes:
        text: the text parsed, or None for "not given" (:meth:`resolve` then uses its default).
        indices: the layer indices as written (negative allowed), or None when not given.
        param: the engine parameter it came from, for messages (e.g. ``"layers"``).
    """

    text: str | None
    indices: tuple[int, ...] | None
    param: str = "layers"

    @classmethod
    def parse(cls, text: str | None, param: str = "layers") -> "LayerSpec":
        """Parse ``"12"``, ``"8,12,16"``, ``"4:8"`` (half-open) or ``"-1"``; None means "not given".

        Raises:
            ToolkitError (``param``): not integers, or an empty selection (``""``, ``"5:5"``, ``"3:1"``).
        """
        if text is None:
            return cls(None, None, param)
        return cls(text, _parse_indices(str(text), param, "layer"), param)

    @classmethod
    def of(cls, indices: Sequence[int], param: str = "layers") -> "LayerSpec":
        """A selection given as ints rather than text (an integer option, a direction's recorded layer).

        Raises:
            ToolkitError (``param``): no index.
        """
        idx = tuple(int(i) for i in indices)
        if not idx:
            raise ToolkitError("names no layer", param=param)
        return cls(",".join(map(str, idx)), idx, param)

    @property
    def given(self) -> bool:
        """Whether a selection was given (else :meth:`resolve` returns its default)."""
        return self.indices is not None

    def resolve(self, n_layers: int, default: Sequence[int] | None = None) -> tuple[int, ...]:
        """The selected layers of a model with ``n_layers`` blocks: non-negative, in order, without repeats.

        Args:
            n_layers: the model's number of decoder blocks.
            default: layers used when no selection was given (checked the same way) [default: every layer].

        Raises:
            ToolkitError (``param``): a layer out of range (``-n_layers <= layer < n_layers``).
        """
        layers = self.indices if self.indices is not None else (
            tuple(default) if default is not None else tuple(range(n_layers)))
        out = []
        for layer in layers:
            if not -n_layers <= int(layer) < n_layers:
                raise ToolkitError(f"layer {layer} is out of range: this model has {n_layers} layers "
                                   f"(0..{n_layers - 1})", param=self.param)
            out.append(int(layer) % n_layers)
        return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class PositionSpec:
    """A selection of prompt positions as the user wrote it, parsed (module docstring for the syntax).

    Attributes:
        text: the text parsed, or None for "not given".
        keyword: ``post``, ``last`` or ``all``, or None for explicit indices (or not given).
        indices: the explicit negative indices, sorted and distinct, or None.
        param: the engine parameter it came from, for messages.
    """

    text: str | None
    keyword: str | None
    indices: tuple[int, ...] | None
    param: str = "positions"

    @classmethod
    def parse(cls, text: str | None, param: str = "positions", allow_all: bool = True) -> "PositionSpec":
        """Parse ``"post"``, ``"last"``, ``"all"`` or negative indices (``"-1,-3"``, ``"-3:0"``); None means "not
        given".

        Args:
            allow_all: whether ``all`` (every position, generated tokens included) is accepted.

        Raises:
            ToolkitError (``param``): not a keyword nor integers, an empty selection, a non-negative index, or
                ``all`` where it is not accepted.
        """
        if text is None:
            return cls(None, None, None, param)
        s = str(text).strip().lower()
        if s in POSITION_KEYWORDS:
            if s == "all" and not allow_all:
                raise ToolkitError("'all' is not supported here: name positions (negative indices, post, last)",
                                   param=param)
            return cls(text, s, None, param)
        try:
            pos = _parse_indices(s, param, "position")
        except ToolkitError:
            raise ToolkitError(f"must be {'all, ' if allow_all else ''}last, post or negative indices like "
                               f"'-1,-2', got {text!r}", param=param) from None
        bad = [p for p in pos if p >= 0]
        if bad:
            raise ToolkitError(f"position {bad[0]} is not a negative index (from the end of the prompt) in {text!r}",
                               param=param)
        return cls(text, None, tuple(sorted(set(pos))), param)

    @property
    def given(self) -> bool:
        """Whether a selection was given."""
        return self.text is not None

    def resolve(self, post_positions: Sequence[int], default: Sequence[int] | None = None
                ) -> tuple[int, ...] | None:
        """The selected positions: sorted distinct negative indices, or None for ``all``.

        Args:
            post_positions: the chat template's post-instruction positions (negative), for ``post``.
            default: positions used when no selection was given [default: ``post_positions``].
        """
        if self.keyword == "all":
            return None
        if self.keyword == "last":
            return (-1,)
        if self.keyword == "post" or (self.text is None and default is None):
            return tuple(sorted(set(int(p) for p in post_positions)))
        if self.text is None:
            return tuple(sorted(set(int(p) for p in default)))
        return self.indices


def check_position(position: int, param: str = "position") -> int:
    """A single prompt position, which must be a negative index from the end of the prompt.

    Raises:
        ToolkitError (``param``): a non-negative index.
    """
    if position >= 0:
        raise ToolkitError(f"must be a negative index from the end of the prompt, got {position}", param=param)
    return int(position)


def check_site(site: str, param: str = "site") -> str:
    """A hook site name (:data:`toolkit.hooks.SITES`).

    Raises:
        ToolkitError (``param``): an unknown site.
    """
    from .hooks import SITES

    if site not in SITES:
        raise ToolkitError(f"unknown hook site {site!r}; choose one of {', '.join(SITES)}", param=param)
    return site
