//! Shared pieces of the fuzz targets: an arbitrary JSON value builder, an independent YAML 1.1 plain-scalar
//! resolver (what PyYAML and go-yaml v2 make of an unquoted scalar), a checker that walks rendered YAML against
//! the value it should carry, and an independent SOPS + age decrypter.

pub mod sops_reader;
pub mod value;
pub mod yaml11;
