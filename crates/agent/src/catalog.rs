//! Which exports a listener offers.

use std::collections::BTreeMap;
use std::sync::Arc;

use tandem_nbd::{Catalog, Export};

/// A volume's own Unix socket: its export, by name or as the default.
pub struct SingleExport(pub Arc<dyn Export>);

impl Catalog for SingleExport {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        (name.is_empty() || name == self.0.name()).then(|| Arc::clone(&self.0))
    }

    fn list(&self) -> Vec<Arc<dyn Export>> {
        vec![Arc::clone(&self.0)]
    }
}

/// The TCP listener's exports as promotions and demotions change them.
pub struct LiveExports(pub Arc<parking_lot::RwLock<BTreeMap<String, Arc<dyn Export>>>>);

impl Catalog for LiveExports {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        let exports = self.0.read();
        if name.is_empty() && exports.len() == 1 {
            return exports.values().next().cloned();
        }
        exports.get(name).cloned()
    }

    fn list(&self) -> Vec<Arc<dyn Export>> {
        self.0.read().values().cloned().collect()
    }
}
