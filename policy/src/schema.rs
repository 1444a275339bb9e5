//! JSON Schema
