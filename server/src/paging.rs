//! Paging of lists: `page` (from 1) and `per_page` (default 50, at most 200). The routes read them from
//! the query string; the services page their queries with them.

use serde::Serialize;
use utoipa::ToSchema;

pub const DEFAULT_PER_PAGE: u32 = 50;
pub const MAX_PER_PAGE: u32 = 200;

/// A page request, clamped to sane bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paging {
    pub page: u32,
    pub per_page: u32,
}

impl Paging {
    pub fn new(page: Option<u32>, per_page: Option<u32>) -> Self {
        Self {
            page: page.unwrap_or(1).clamp(1, 1_000_000),
            per_page: per_page.unwrap_or(DEFAULT_PER_PAGE).clamp(1, MAX_PER_PAGE),
        }
    }

    pub fn limit(self) -> i64 {
        self.per_page as i64
    }

    pub fn offset(self) -> i64 {
        (self.page as i64 - 1) * self.per_page as i64
    }

    pub fn info(self, total: i64) -> PageInfo {
        PageInfo {
            page: self.page,
            per_page: self.per_page,
            total,
        }
    }
}

/// Where a page sits in the whole list.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PageInfo {
    pub page: u32,
    pub per_page: u32,
    pub total: i64,
}
