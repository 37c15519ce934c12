//! Levels from points: the Level Up XP curve. Each level's step is the
//! previous step times the coefficient, rounded, so with base 120 and
//! coefficient 1.3 the thresholds are 0, 120, 276, 479, 743, 1086, …

/// A level curve; thresholds precomputed.
#[derive(Debug, Clone)]
pub struct LevelCurve {
    thresholds: Vec<i64>,
}

/// Levels computed; points past the last stay at the top level.
const MAX_LEVELS: usize = 100;

impl LevelCurve {
    pub fn new(base: f64, coefficient: f64) -> Self {
        let mut thresholds = vec![0i64];
        let mut total = 0i64;
        let mut step = base;
        for _ in 0..MAX_LEVELS - 1 {
            // Each step is rounded before the next is derived from it, as
            // Level Up XP does: 120, 156, 203, 264, 343, …
            let rounded = step.round();
            if !rounded.is_finite() || rounded < 1.0 || rounded > (i64::MAX / 4) as f64 {
                break;
            }
            total = total.saturating_add(rounded as i64);
            thresholds.push(total);
            step = rounded * coefficient;
        }
        Self { thresholds }
    }

    /// The level for a total (1 at 0 points).
    pub fn level(&self, points: i64) -> i64 {
        self.thresholds.partition_point(|t| *t <= points).max(1) as i64
    }

    /// Points at which the next level starts (the last threshold at the top).
    pub fn next_threshold(&self, points: i64) -> i64 {
        let i = self.thresholds.partition_point(|t| *t <= points);
        *self
            .thresholds
            .get(i)
            .or(self.thresholds.last())
            .unwrap_or(&0)
    }
}

impl Default for LevelCurve {
    fn default() -> Self {
        Self::new(120.0, 1.3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_curve_is_level_up_xp() {
        let c = LevelCurve::default();
        assert_eq!(
            &c.thresholds[..10],
            &[0, 120, 276, 479, 743, 1086, 1532, 2112, 2866, 3846]
        );
        assert_eq!(c.level(0), 1);
        assert_eq!(c.level(119), 1);
        assert_eq!(c.level(120), 2);
        assert_eq!(c.level(3846), 10);
        assert_eq!(c.next_threshold(130), 276);
        assert_eq!(c.level(-5), 1);
    }
}
