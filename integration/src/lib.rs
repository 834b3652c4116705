//! Placeholder: filled by a later issue. Nothing here claims to work yet.

pub mod chunk_study;
pub mod control_plane;
pub mod corpus;
