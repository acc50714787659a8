pub mod attack;
pub mod bench;
pub mod eval;
pub mod forward;
pub mod generate;
pub mod geometry;
pub mod model;
pub mod train;
