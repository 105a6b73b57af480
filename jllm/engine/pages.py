"""The engine's page pool on the host: reference counts, a free list and the prefix cache.

A page is free (on the free list), owned (reference count > 0), or cached and unreferenced (in
the prefix cache and on the LRU list, reusable until evicted). A full page of a request is
registered in the prefix cache under the hash of its tokens and of every token before it, so a
later request with the same prefix takes the page (one more reference) instead of recomputing
it. Allocation takes free pages first, then evicts the least recently released cached page.
"""
import collections
import hashlib
import struct
from collections.abc import Sequence


def block_hash(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """The prefix-cache key of a full page: its tokens and (through `parent`, the previous page's
    key) every token before it. SHA-256, because a hit is trusted without comparing tokens: with
    Python's hash(), which can be inverted, a crafted prompt could take another user's pages."""
    h = hashlib.sha256(b"\0" if parent is None else b"\1" + parent)
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.digest()


class PagePool:
    """Pages 0..num_pages-1 of the device pool, tracked on the host (module docstring)."""

    def __init__(self, num_pages: int, prefix_caching: bool = True):
        self.num_pages = num_pages
        self.prefix_caching = prefix_caching
        self.refs = [0] * num_pages
        self.free = collections.deque(range(num_pages))
        self.cached: dict[bytes, int] = {}      # block hash -> page
        self.page_key: dict[int, bytes] = {}    # page -> block hash, for every cached page
        self.lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # unreferenced cached pages, oldest first
        self.used = 0                            # pages with a reference

    def available(self) -> int:
        """Pages an allocation can take now (free, or cached and unreferenced)."""
        return len(self.free) + len(self.lru)

    def allocate(self, n: int) -> list[int]:
        """n pages, each with one reference; the caller checks `available()` first."""
        if not 0 <= n <= self.available():
            raise RuntimeError(f"allocate({n}) with {self.available()} pages available")
        pages = []
        for _ in range(n):
            if self.free:
                page = self.free.popleft()
            else:  # evict the least recently released cached page
                page, _ = self.lru.popitem(last=False)
                del self.cached[self.page_key.pop(page)]
            self.refs[page] = 1
            pages.append(page)
        self.used += n
        return pages

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference from each page. Released last page first, so that a request's tail
        pages leave the prefix cache before its head (the part other prompts share)."""
        for page in reversed(pages):
            self.refs[page] -= 1
            if self.refs[page] < 0:
                raise RuntimeError(f"page {page} released more often than taken")
            if self.refs[page] == 0:
                self.used -= 1
                if page in self.page_key:
                    self.lru[page] = None
                else:
                    self.free.append(page)

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The cached pages of the longest prefix of `keys` (block hashes), without taking them."""
        pages = []
        if self.prefix_caching:
            for key in keys:
                page = self.cached.get(key)
                if page is None:
                    break
                pages.append(page)
        return pages

    def share(self, pages: Sequence[int]) -> None:
        """Take one reference on each of `pages` (cached pages found by `lookup`)."""
        for page in pages:
            if self.refs[page] == 0:
                self.lru.pop(page)
                self.used += 1
            self.refs[page] += 1

    def register(self, page: int, key: bytes) -> None:
        """Put an owned, full page in the prefix cache under `key` (kept out if the key or the page
        is there already: a twin prompt computed in the same steps stays private)."""
        if self.prefix_caching and key not in self.cached and page not in self.page_key:
            self.cached[key] = page
            self.page_key[page] = key

    def evict_all(self) -> int:
        """Drop every unreferenced page from the prefix cache -> how many were freed."""
        n = len(self.lru)
        while self.lru:
            page, _ = self.lru.popitem(last=False)
            del self.cached[self.page_key.pop(page)]
            self.free.append(page)
        return n

    def check(self) -> None:
        """Raise if the accounting is inconsistent: every page is free, owned, or cached and
        unreferenced, exactly one of them."""
        free, lru = set(self.free), set(self.lru)
        if len(free) != len(self.free):
            raise AssertionError("a page is on the free list twice")
        for page in range(self.num_pages):
            owned = self.refs[page] > 0
            states = (page in free) + (page in lru) + owned
            if states != 1:
                raise AssertionError(f"page {page}: free={page in free} lru={page in lru} refs={self.refs[page]}")
            if page in lru and page not in self.page_key:
                raise AssertionError(f"page {page} is on the LRU list but not cached")
            if page in free and page in self.page_key:
                raise AssertionError(f"page {page} is free but still cached")
        if self.used != sum(r > 0 for r in self.refs):
            raise AssertionError(f"used={self.used} != {sum(r > 0 for r in self.refs)} referenced pages")
        if {self.cached[k] for k in self.page_key.values()} != set(self.page_key):
            raise AssertionError("the prefix cache's two maps disagree")
