"""Shape bookkeeping shared by sources that decode another tensor row for row."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class _Shaped(Protocol):
    @property
    def path(self) -> Path: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def numel(self) -> int: ...

    @property
    def rows(self) -> int: ...

    @property
    def row_elements(self) -> int: ...


class SameGeometry:
    """Mixin: the source has the path, shape and rows of the tensor `_geometry` returns."""

    @property
    def _geometry(self) -> _Shaped:
        raise NotImplementedError

    @property
    def path(self) -> Path:
        return self._geometry.path

    @property
    def shape(self) -> tuple[int, ...]:
        return self._geometry.shape

    @property
    def numel(self) -> int:
        return self._geometry.numel

    @property
    def rows(self) -> int:
        return self._geometry.rows

    @property
    def row_elements(self) -> int:
        return self._geometry.row_elements
