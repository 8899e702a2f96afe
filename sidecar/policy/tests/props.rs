//! Property tests: path normalization and template matching.

use apiward_policy::normalize::normalize;
use apiward_policy::router::{Router, capture};
use apiward_policy::template::PathTemplate;
use proptest::prelude::*;

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9]{1,8}",
        Just(".".to_string()),
        Just("..".to_string()),
        Just(String::new()),
        "%[0-9A-Fa-f]{2}",
        "[a-z]{1,3}%3[0-9]",
    ]
}

proptest! {
    #[test]
    fn normalization_is_idempotent_and_canonical(segs in proptest::collection::vec(segment(), 0..12)) {
        let raw = format!("/{}", segs.join("/"));
        if let Ok(n) = normalize(&raw) {
            let s = n.as_str();
            prop_assert!(s.starts_with('/'));
            prop_assert!(!s.contains("//"), "{raw} -> {s}");
            prop_assert!(!s.split('/').any(|x| x == "." || x == ".."), "{raw} -> {s}");
            let again = normalize(s).unwrap();
            prop_assert_eq!(again.as_str(), s);
        }
    }

    #[test]
    fn a_template_matches_the_paths_it_describes(
        lits in proptest::collection::vec("[a-z]{1,6}", 1..6),
        param_at in 0usize..6,
        value in "[A-Za-z0-9_-]{1,10}",
    ) {
        let param_at = param_at % lits.len();
        let template: Vec<String> = lits.iter().enumerate()
            .map(|(i, l)| if i == param_at { "{p}".to_string() } else { l.clone() })
            .collect();
        let t = PathTemplate::parse(&format!("/{}", template.join("/"))).unwrap();
        let path_segs: Vec<String> = lits.iter().enumerate()
            .map(|(i, l)| if i == param_at { value.clone() } else { l.clone() })
            .collect();
        let path = normalize(&format!("/{}", path_segs.join("/"))).unwrap();
        let mut r = Router::default();
        let id = r.insert(t.clone());
        let mut hits = Vec::new();
        r.matches(&path, &mut hits);
        prop_assert_eq!(hits, vec![id]);
        prop_assert_eq!(capture(&t, &path, "p"), Some(value.as_str()));
        // One more segment never matches a template without a tail.
        let longer = normalize(&format!("{}/x", path.as_str())).unwrap();
        let mut hits = Vec::new();
        r.matches(&longer, &mut hits);
        prop_assert!(hits.is_empty());
    }

    #[test]
    fn an_encoded_path_means_the_same_as_its_decoded_form(id in "[a-z0-9]{1,8}") {
        let encoded: String = id.bytes().map(|b| format!("%{b:02X}")).collect();
        let n = normalize(&format!("/users/{encoded}")).unwrap();
        prop_assert_eq!(n.as_str(), format!("/users/{id}"));
    }
}
