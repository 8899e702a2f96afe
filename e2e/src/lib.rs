//! apiward end-to-end tests live in `tests/`; see `README.md` for why each exists.
#![forbid(unsafe_code)]
