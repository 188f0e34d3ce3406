#![allow(dead_code)]
pub mod guard;
