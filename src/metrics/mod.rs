//! Measurements of a generation: model perplexities ([`perplexity`]) and corpus statistics.

pub mod corpus;
pub mod perplexity;
