//! Placeholder: filled by a later issue. Nothing here claims to work yet.
