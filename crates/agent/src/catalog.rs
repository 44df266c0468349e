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

/// The optional TCP listener: every volume this site serves, by name (the
/// default export only when there is exactly one).
pub struct AllExports(pub BTreeMap<String, Arc<dyn Export>>);

impl Catalog for AllExports {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        if name.is_empty() && self.0.len() == 1 {
            return self.0.values().next().cloned();
        }
        self.0.get(name).cloned()
    }

    fn list(&self) -> Vec<Arc<dyn Export>> {
        self.0.values().cloned().collect()
    }
}
